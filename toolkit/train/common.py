"""Pieces every training loop shares: device choice, schedules, seeding, atomic train-state files."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


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


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params: list[torch.nn.Parameter],
                   grad_clip: float | None = 1.0) -> float:
    """The one update every training loop makes: backward, clip the global gradient norm, step, schedule.
    Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def fit_minibatches(params: list[torch.nn.Parameter], batch_loss: Callable[[torch.Tensor], torch.Tensor], n_items: int,
                    batch_size: int, epochs: int, lr: float, weight_decay: float, warmup_steps: int,
                    gen: torch.Generator, desc: str, grad_clip: float = 1.0) -> tuple[int, float]:
    """The supervised recipe the backbone trainers share: AdamW, warm-up + cosine, gradient clipping, ``epochs``
    passes over shuffled mini-batches (the last partial batch dropped). ``batch_loss(idx)`` returns the loss of
    items ``idx``. Returns (steps, seconds)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, n_items // batch_size)
    total = epochs * steps_per_epoch
    sched = warmup_cosine(opt, warmup_steps, total)
    t0 = time.time()
    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n_items, generator=gen)
            for s in range(steps_per_epoch):
                loss = optimizer_step(batch_loss(order[s * batch_size:(s + 1) * batch_size]), opt, sched, params,
                                      grad_clip)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
    return total, time.time() - t0


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
