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
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from toolkit.config import StageConfig, TrainConfig
from toolkit.llm import IGNORE_INDEX, PromptTemplate, answer_logits
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


def train_vlm(vlm: VLM, features: torch.Tensor, turns: Sequence[Turn], cfg: TrainConfig, out_dir: Path,
              device: torch.device, stages: Sequence[StageConfig] | None = None) -> dict:
    """Run the configured stages; resume from ``out_dir/train_state.pt`` when present. Returns a record."""
    stages = tuple(stages or cfg.stages)
    state_path = out_dir / "train_state.pt"
    state = load_train_state(state_path)
    start_stage, start_step, losses = 0, 0, []
    if state is not None:
        vlm.load_trainable(state["trainable"])
        start_stage, start_step, losses = state["stage"], state["step"], list(state["losses"])
    vlm.to(device)
    mix = training_mix(cfg)
    by_image = _group(turns, mix)
    t0 = time.time()
    for si in range(start_stage, len(stages)):
        st = stages[si]
        vlm.train()
        vlm.lm.requires_grad_(st.train_lm)
        params = [p for p in list(vlm.connector.parameters()) + list(vlm.lm.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=cfg.weight_decay)
        sched = warmup_cosine(opt, int(cfg.warmup_frac * st.steps), st.steps)
        gen = torch.Generator().manual_seed(cfg.seed + 1000 * si)
        step = 0
        if state is not None and si == start_stage:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["rng"])
            step = start_step
        bar = tqdm(total=st.steps, initial=step, desc=f"{vlm.cfg.backbone} {st.name}", unit="step", leave=False)
        while step < st.steps:
            batch = _sample(by_image, st.batch_size, cfg.turns_per_image, mix, gen)
            feats = features[[conv[0].image for conv in batch]].to(device)
            loss = vlm.turns_loss(feats, [[(t.prompt, t.answer) for t in conv] for conv in batch], isolate=True)
            loss = optimizer_step(loss, opt, sched, params, cfg.grad_clip)
            step += 1
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % cfg.checkpoint_every == 0 and step < st.steps:
                save_train_state(state_path, stage=si, step=step, losses=losses, trainable=vlm.trainable_state_dict(),
                                 optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=gen.get_state())
        bar.close()
        state = None
    vlm.save(out_dir)
    state_path.unlink(missing_ok=True)
    return dict(seconds=round(time.time() - t0, 1), steps=sum(s.steps for s in stages), final_loss=_tail_mean(losses),
                loss_curve=loss_curve(losses))


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
