"""Pieces every training loop shares: device choice, schedules, seeding, atomic train-state files, loss curves."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from toolkit.checkpoints import save_safetensors
from toolkit.train import distributed


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def optimizer_step(loss: torch.Tensor | Callable[[], float], opt: torch.optim.Optimizer, sched,
                   params: list[torch.nn.Parameter], grad_clip: float | None = 1.0) -> float:
    """The one update every training loop makes: backward, clip the global gradient norm, step, schedule.
    ``loss`` is the step's loss, or a function that runs the step's backward passes itself (micro-batches of
    gradient accumulation and of distributed ranks) and returns the step's loss. Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    if callable(loss):
        value = loss()
    else:
        loss.backward()
        value = loss.item()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return value


def fit_minibatches(params: list[torch.nn.Parameter], batch_loss: Callable[[torch.Tensor], torch.Tensor], n_items: int,
                    batch_size: int, epochs: int, lr: float, weight_decay: float, warmup_steps: int,
                    gen: torch.Generator, desc: str, grad_clip: float = 1.0, state_path: Path | None = None,
                    modules: Sequence[torch.nn.Module] = (),
                    checkpoint_every: int = 100) -> tuple[int, float, list[float]]:
    """The supervised recipe the backbone trainers share: AdamW, warm-up + cosine, gradient clipping, ``epochs``
    passes over shuffled mini-batches (the last partial batch dropped). ``batch_loss(idx)`` returns the loss of
    items ``idx``. Returns (steps, seconds, per-step losses).

    With ``state_path``, the state of ``modules`` (whatever holds ``params``), optimizer, scheduler, ``gen``, the
    global torch RNG and the epoch's order is saved there every ``checkpoint_every`` steps; a restart picks it up and
    reaches the same weights, and the file is removed at the end. ``gen`` is saved mid-epoch (``batch_loss`` may
    draw from it too), so the epoch's order is saved with it rather than redrawn."""
    from tqdm.auto import tqdm

    if state_path is not None and not modules:
        raise ValueError("resuming needs the modules whose state to save: pass `modules`")
    d = distributed.current()
    if batch_size % d.world:
        raise ValueError(f"batch_size {batch_size} does not split over {d.world} processes")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, n_items // batch_size)
    total = epochs * steps_per_epoch
    sched = warmup_cosine(opt, warmup_steps, total)
    step, losses, order = 0, [], None
    state = load_train_state(state_path) if state_path is not None else None
    if state is not None:
        for m, sd in zip(modules, state["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, losses, order = state["step"], list(state["losses"]), state["order"]
    t0 = time.time()
    with tqdm(total=total, initial=step, desc=desc, unit="step", leave=False) as bar:
        while step < total:
            s = step % steps_per_epoch
            if s == 0:
                order = torch.randperm(n_items, generator=gen)
            idx = order[s * batch_size:(s + 1) * batch_size]

            def backward(idx=idx) -> float:
                # Under torchrun each rank takes an equal share of the batch; averaged gradients are the batch's.
                loss = batch_loss(idx[d.rank::d.world])
                loss.backward()
                distributed.average_gradients(params)
                return distributed.all_sum(loss.item()) / d.world

            loss = optimizer_step(backward, opt, sched, params, grad_clip)
            step += 1
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            if state_path is not None and step % checkpoint_every == 0 and step < total and d.main:
                save_train_state(state_path, step=step, losses=losses, order=order,
                                 modules=[m.state_dict() for m in modules], optimizer=opt.state_dict(),
                                 scheduler=sched.state_dict(), rng=gen.get_state(), torch_rng=torch.get_rng_state(),
                                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    distributed.barrier()
    if state_path is not None and d.main:
        state_path.unlink(missing_ok=True)
    return total, time.time() - t0, losses


def save_backbone(backbone: torch.nn.Module, out_path: Path, record: dict) -> dict:
    """A trained backbone's weights (safetensors) and its JSON record beside them, written by rank 0 alone."""
    if distributed.current().main:
        save_safetensors(backbone.state_dict(), out_path)
        out_path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    distributed.barrier()
    return record


def loss_curve(losses: Sequence[float], points: int = 100) -> list[list[float]]:
    """Per-step losses -> ``[[step, mean loss of the block ending there], ...]`` in blocks of
    ``max(1, len // points)`` steps: a JSON record keeps the curve's shape in under ``2 * points`` entries."""
    block = max(1, len(losses) // points)
    curve = []
    for i in range(0, len(losses), block):
        chunk = losses[i:i + block]
        curve.append([i + len(chunk), round(sum(chunk) / len(chunk), 4)])
    return curve


def save_train_state(path: Path, **state) -> None:
    """Write atomically so an interruption during the write never loses the previous state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
