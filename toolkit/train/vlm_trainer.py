"""VLM training stages over a frozen backbone, resumable after an interruption.

The backbone is frozen, so its tokens for every training image are computed once and reused by
every step (``encode_all``); only the connector (``align``) or connector + LM (``finetune``) train.
A train state (weights, optimizer, scheduler, sampler RNG, position) is written atomically every
``checkpoint_every`` steps; a restarted run picks up from it and reaches the same final weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from toolkit.config import StageConfig, TrainConfig
from toolkit.llm import IGNORE_INDEX, PromptTemplate, answer_logits
from toolkit.train import distributed
from toolkit.train.common import load_train_state, loss_curve, optimizer_step, save_train_state, warmup_cosine
from toolkit.vlm import VLM


@dataclass(frozen=True)
class Turn:
    """One supervised turn: the image it is about (index into the image list), the prompt and the answer."""

    image: int
    prompt: str
    answer: str
    kind: str  # "grounding" | "vqa" | "objects"


@torch.no_grad()
def encode_all(vlm: VLM, image_paths: Sequence[str | Path], batch_size: int = 64, desc: str = "encode") -> torch.Tensor:
    """Visual tokens ``(N_images, N_tokens, C_vis)`` for every image, on the CPU."""
    out = []
    for i in tqdm(range(0, len(image_paths), batch_size), desc=desc, unit="batch", leave=False):
        pixels = torch.stack([vlm.preprocess(Image.open(p))[0] for p in image_paths[i:i + batch_size]])
        out.append(vlm.encode_images(pixels).float().cpu())
    return torch.cat(out)


class EncodedOnDemand:
    """Visual tokens computed when indexed (``features[[i, j, ...]] -> (k, N, C_vis)``), for training sets whose
    tokens do not fit in memory (paper scale: 665k images x 196 tokens x 768 channels is 400 GB)."""

    def __init__(self, vlm: VLM, image_paths: Sequence[str | Path]):
        self.vlm, self.paths = vlm, list(image_paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: Sequence[int]) -> torch.Tensor:
        pixels = torch.stack([self.vlm.preprocess(Image.open(self.paths[i]))[0] for i in idx])
        return self.vlm.encode_images(pixels).float()


def visual_tokens(vlm: VLM, image_paths: Sequence[str | Path], max_bytes: float = 4e9, desc: str = "encode"):
    """Every image's visual tokens, computed once and held in memory when they take at most ``max_bytes``
    (the frozen backbone then runs once per image, not once per step), else ``EncodedOnDemand``."""
    n_tokens = vlm.backbone.num_tokens(tuple(vlm.backbone.data_config.img_size))
    if len(image_paths) * n_tokens * vlm.backbone.embed_dim * 4 > max_bytes:
        return EncodedOnDemand(vlm, image_paths)
    return encode_all(vlm, image_paths, desc=desc)


def training_mix(cfg: TrainConfig) -> dict[str, float]:
    """Share of each turn kind in a batch."""
    rest = 1.0 - cfg.grounding_fraction - cfg.objects_fraction
    if rest < -1e-9:
        raise ValueError(f"grounding_fraction + objects_fraction = {1 - rest:.3f} > 1")
    return {"grounding": cfg.grounding_fraction, "objects": cfg.objects_fraction, "vqa": max(0.0, rest)}


def _group(turns: Sequence[Turn], mix: dict[str, float]) -> list[dict[str, list[Turn]]]:
    """Turns grouped by image, then by kind; images without a turn of a kind in the mix are left out."""
    by_image: dict[int, dict[str, list[Turn]]] = {}
    for t in turns:
        if mix.get(t.kind, 0) > 0:
            by_image.setdefault(t.image, {}).setdefault(t.kind, []).append(t)
    if not by_image:
        raise ValueError(f"no training turns of the kinds in the mix {mix}")
    return [by_image[i] for i in sorted(by_image)]


def _sample(by_image: list[dict[str, list[Turn]]], batch_size: int, turns_per_image: int, mix: dict[str, float],
            gen: torch.Generator) -> list[list[Turn]]:
    """``batch_size`` images drawn with replacement, each with up to ``turns_per_image`` of its turns drawn without
    replacement; each turn's kind is drawn by ``mix``, renormalised over the kinds the image has left."""
    batch = []
    for i in torch.randint(len(by_image), (batch_size,), generator=gen).tolist():
        pools = {k: list(v) for k, v in by_image[i].items()}
        conv = []
        while len(conv) < turns_per_image and pools:
            kinds = list(pools)
            k = kinds[int(torch.multinomial(torch.tensor([mix[k] for k in kinds]), 1, generator=gen))]
            conv.append(pools[k].pop(int(torch.randint(len(pools[k]), (), generator=gen))))
            if not pools[k]:
                del pools[k]
        batch.append(conv)
    return batch


class TurnsLoss(nn.Module):
    """The trained part of a VLM (connector + LM) as one module, the one DDP and FSDP wrap:
    ``(visual tokens (B, N, C_vis), conversations) -> summed answer-token loss``. The frozen backbone stays out."""

    def __init__(self, vlm: VLM, unit: str = "token"):
        super().__init__()
        self.connector, self.lm = vlm.connector, vlm.lm
        self._vlm = (vlm,)  # a tuple, so the VLM (and its backbone) is not a submodule
        self.unit = unit

    def forward(self, visual_tokens: torch.Tensor, conversations: Sequence[Sequence[tuple[str, str]]]) -> torch.Tensor:
        return self._vlm[0].turns_loss(visual_tokens, conversations, isolate=True, reduction="sum", unit=self.unit)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _add_lora(vlm: VLM, r: int) -> None:
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in vlm.lm.named_modules() if isinstance(m, nn.Linear)}
                     & set(LORA_TARGETS))
    if not targets:
        raise ValueError(f"train.lora_r={r}: the LM has none of the linear layers LoRA adapts ({', '.join(LORA_TARGETS)})")
    vlm.lm = get_peft_model(vlm.lm, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))


def _micro_batches(batch: list, d: distributed.Dist, accum: int) -> list[list]:
    """This rank's ``accum`` slices of the global batch (the same batch on every rank)."""
    n = d.world * accum
    if len(batch) % n:
        raise ValueError(f"a batch of {len(batch)} images does not split into {d.world} processes x {accum} "
                         f"accumulation steps: make the stage's batch_size a multiple of {n}")
    k = len(batch) // n
    return [batch[(d.rank * accum + j) * k:(d.rank * accum + j + 1) * k] for j in range(accum)]


Monitor = Callable[[VLM], dict[str, float]]


def monitor_steps(cfg: TrainConfig, stages: Sequence[StageConfig]) -> set[int]:
    """Global steps (counted over all stages) after which the monitor runs: ``cfg.monitor_points`` evenly spaced
    ones, the last step included."""
    total = sum(s.steps for s in stages)
    n = min(cfg.monitor_points, total)
    return {round(total * (i + 1) / n) for i in range(n)} if n > 0 else set()


def train_vlm(vlm: VLM, features: torch.Tensor, turns: Sequence[Turn], cfg: TrainConfig, out_dir: Path,
              device: torch.device, stages: Sequence[StageConfig] | None = None, monitor: Monitor | None = None) -> dict:
    """Run the configured stages; resume from ``out_dir/train_state.pt`` when present (on any number of
    processes: see ``toolkit.train.distributed``). Returns a record; rank 0 writes the VLM.

    ``monitor(vlm) -> {metric: value}`` (e.g. grounding accuracy on a few validation expressions) runs on rank 0 at
    ``monitor_steps``; its results go into the record's ``monitor_curve`` ([[step, {metric: value}], ...]). It
    needs the whole model on rank 0, so FSDP runs over several processes skip it."""
    stages = tuple(stages or cfg.stages)
    d = distributed.current()
    state_path = out_dir / "train_state.pt"
    state = load_train_state(state_path)
    start_stage, start_step, losses, monitored = 0, 0, [], []
    if state is not None:
        start_stage, start_step, losses = state["stage"], state["step"], list(state["losses"])
        monitored = list(state.get("monitored", []))
    if cfg.strategy == "fsdp" and d.world > 1:
        monitor = None
    at_steps = monitor_steps(cfg, stages) if monitor is not None else set()
    done_before = sum(s.steps for s in stages[:start_stage])
    vlm.to(device)
    if cfg.lora_r:
        _add_lora(vlm, cfg.lora_r)
    if cfg.activation_checkpointing:
        vlm.lm.gradient_checkpointing_enable()
    core = TurnsLoss(vlm, cfg.loss_unit)
    mix = training_mix(cfg)
    by_image = _group(turns, mix)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    t0 = time.time()
    for si in range(start_stage, len(stages)):
        st = stages[si]
        vlm.train()
        for name, p in vlm.lm.named_parameters():
            p.requires_grad_(st.train_lm and (not cfg.lora_r or "lora_" in name))
        model = distributed.wrap(core, cfg.strategy, d, layers=list(vlm.lm.get_decoder().layers))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=cfg.weight_decay)
        sched = warmup_cosine(opt, int(cfg.warmup_frac * st.steps), st.steps)
        gen = torch.Generator().manual_seed(cfg.seed + 1000 * si)
        step = 0
        if state is not None and si == start_stage:
            distributed.load_full_state(model, opt, state["trainable"], state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["rng"])
            step = start_step
        bar = tqdm(total=st.steps, initial=step, desc=f"{vlm.cfg.backbone} {st.name}", unit="step", leave=False,
                   disable=not d.main)
        while step < st.steps:
            batch = _sample(by_image, st.batch_size, cfg.turns_per_image, mix, gen)
            answers = [t.answer for conv in batch for t in conv]
            n_tokens = vlm.answer_token_count(answers) if cfg.loss_unit == "token" else len(answers)
            mine = _micro_batches(batch, d, cfg.grad_accum)

            def backward() -> float:
                total = 0.0
                for j, part in enumerate(mine):
                    with distributed.no_sync(model, sync=j == len(mine) - 1):
                        with autocast:
                            loss = model(features[[conv[0].image for conv in part]].to(device),
                                         [[(t.prompt, t.answer) for t in conv] for conv in part])
                        # world / n_tokens (tokens or turns, by loss_unit): the ranks' averaged gradient is the
                        # whole batch's mean-loss gradient
                        (loss * (d.world / n_tokens)).backward()
                    total += loss.item()
                return distributed.all_sum(total) / n_tokens

            loss = optimizer_step(backward, opt, sched, params, cfg.grad_clip)
            step += 1
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            if done_before + step in at_steps:
                if d.main:
                    vlm.eval()
                    with torch.no_grad():
                        monitored.append([done_before + step, monitor(vlm)])
                    vlm.train()
                    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.2f}" for k, v in monitored[-1][1].items()})
                distributed.barrier()
            if step % cfg.checkpoint_every == 0 and step < st.steps:
                weights, optim = distributed.full_state(model, opt)
                if d.main:
                    save_train_state(state_path, stage=si, step=step, losses=losses, trainable=weights,
                                     optimizer=optim, scheduler=sched.state_dict(), rng=gen.get_state(),
                                     monitored=monitored)
                distributed.barrier()
        bar.close()
        done_before += st.steps
        state = None
    weights = distributed.full_weights(core) if cfg.strategy == "fsdp" and d.world > 1 else None
    if cfg.lora_r:
        vlm.lm = vlm.lm.merge_and_unload()
    if d.main:
        vlm.save(out_dir, trainable=weights)
        state_path.unlink(missing_ok=True)
    distributed.barrier()
    return dict(seconds=round(time.time() - t0, 1), steps=sum(s.steps for s in stages), final_loss=_tail_mean(losses),
                loss_curve=loss_curve(losses), monitor_curve=monitored, processes=d.world)


def pretrain_lm_text(lm, tok, template: PromptTemplate, turns: Sequence[Turn], steps: int, batch_size: int, lr: float,
                     device: torch.device, seed: int = 0, state_path: Path | None = None,
                     checkpoint_every: int = 100) -> float:
    """Text-only warm-up of a fresh LM on the world's prompts and answers (no image tokens), shared by all
    backbones so every VLM starts from the same language model. Returns the mean loss of the last steps.
    With ``state_path``, resumable as ``train_vlm`` is (the file is removed at the end)."""
    lm = lm.to(device).train()
    params = list(lm.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    sched = warmup_cosine(opt, max(1, steps // 20), steps)
    gen = torch.Generator().manual_seed(seed)
    start, losses = 0, []
    state = load_train_state(state_path) if state_path is not None else None
    if state is not None:
        lm.load_state_dict(state["lm"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
        start, losses = state["step"], list(state["losses"])
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="LM warm-up (text only)",
                     unit="step", leave=False):
        batch = [turns[int(i)] for i in torch.randint(len(turns), (batch_size,), generator=gen)]
        texts = [template.prompt(t.prompt) + " " + t.answer + tok.eos_token for t in batch]
        enc = tok([tok.bos_token + s for s in texts], add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, IGNORE_INDEX)
        embeds = lm.get_input_embeddings()(enc.input_ids)
        loss = F.cross_entropy(*answer_logits(lm, embeds, enc.attention_mask, labels))
        losses.append(optimizer_step(loss, opt, sched, params, grad_clip=None))
        if state_path is not None and step % checkpoint_every == 0 and step < steps:
            save_train_state(state_path, step=step, losses=losses, lm=lm.state_dict(), optimizer=opt.state_dict(),
                             scheduler=sched.state_dict(), rng=gen.get_state())
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return _tail_mean(losses)


def _tail_mean(xs: list[float], n: int = 20) -> float:
    tail = xs[-n:]
    return round(sum(tail) / max(1, len(tail)), 4)
