"""Training across processes on torch's own engines: DDP and FSDP (``fully_shard``) under ``torchrun``.

One rule keeps every process count equivalent: each step draws the same global batch on every rank (the samplers
share their seed), the ranks split it into ``world x grad_accum`` micro-batches, and each micro-batch's summed loss is
divided by the global number of supervised tokens, so the averaged gradient equals the one-process gradient of the
whole batch. A train state holds full (unsharded) weights and optimizer state keyed by parameter name, written by
rank 0, so a run resumes on any number of processes.

    torchrun --nproc_per_node 2 -m toolkit.cli demo --strategy ddp   # gloo on CPUs, NCCL on GPUs
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` processes (1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Dist:
    """The process group this process is in, joined on first call when torchrun launched it (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Rank 0 alone generates data and pretrains backbones while the others wait at a barrier: allow hours.
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """Each rank's own GPU under torchrun; CPUs are shared."""
    if device.type == "cuda" and d.world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """``fn()`` on rank 0, then, once it is done, on the other ranks (which then find its files on disk)."""
    d = current()
    out = fn() if d.main else None
    barrier()
    return out if d.main else fn()


def all_sum(x: float) -> float:
    """Sum of ``x`` over the ranks (``x`` itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the ranks in place (one flat all-reduce): data parallelism for the
    loops whose loss closes over an unwrapped model (backbone pretraining, dense tuning)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def wrap(module: nn.Module, strategy: str, d: Dist, layers: list[nn.Module] = ()) -> nn.Module:
    """``module`` for training on ``d``: as is in one process; DDP, or FSDP with each of ``layers`` (the LM's
    decoder blocks) sharded on its own and the rest at the root. Call it again when the set of trained parameters
    changes (a new stage)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy `{strategy}`; choose one of {STRATEGIES}")
    if d.world == 1:
        return module
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):  # sharded once for every stage (DDP is rebuilt per stage: its set of
        return module                   # trained parameters is fixed when it is built)
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def no_sync(model: nn.Module, sync: bool):
    """Skip the gradient reduction of a micro-batch that is not the step's last (gradient accumulation)."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full weights and optimizer state keyed by parameter name, on the CPU (a collective under FSDP: every rank
    calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Inverse of ``full_state``, on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def full_weights(model: nn.Module) -> dict:
    """Full weights keyed by name on the CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
