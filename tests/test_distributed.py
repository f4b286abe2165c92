"""VLM training across processes (torchrun, gloo on CPUs): DDP and FSDP give the one-process loss curve for the same
global batch, a run killed mid-way resumes on another number of processes to the same weights, and gradient
accumulation, activation checkpointing, bf16 autocast and LoRA train as they should."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolkit.llm import LMConfig, train_tokenizer

WORKER = Path(__file__).with_name("dist_worker.py")
LM = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
STEPS = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tokenizer, visual tokens of 16 images and two grounding turns per image, as files the workers read."""
    root = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(16, 2, 4, generator=g).sort(-1).values
    turns = [dict(image=i, prompt=f"object {k} of image {i}", answer="[" + ", ".join(f"{v:.2f}" for v in boxes[i, k])
                  + "]", kind="grounding") for i in range(16) for k in range(2)]
    tok = train_tokenizer([t["prompt"] for t in turns] + ["USER: ASSISTANT:"], 300)
    tok.save_pretrained(str(root / "tokenizer"))
    torch.save(torch.randn(16, 16, 32, generator=g), root / "features.pt")  # vit-test: 4x4 tokens x 32 channels
    stages = [dict(name="align", steps=2, lr=3e-3, batch_size=8, train_lm=False),
              dict(name="finetune", steps=STEPS - 2, lr=3e-3, batch_size=8, train_lm=True)]
    (root / "setup.json").write_text(json.dumps(dict(lm=LM, turns=turns, stages=stages, every=3)))
    return root


def _run(work: Path, out: Path, procs: int, wait: bool = True, **overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    args = [str(work), str(out), json.dumps(overrides)]
    cmd = ([sys.executable, str(WORKER)] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(WORKER)])
    p = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    if not wait:
        return p
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    return [loss for _, loss in json.loads((out / "record.json").read_text())["losses"]]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def single(work):
    out = work / "single"
    return out, _run(work, out, 1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(work, single, strategy):
    out = work / f"two-{strategy}"
    two = _run(work, out, 2, strategy=strategy)
    assert len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single[1]), atol=2e-4, rtol=0)  # the record rounds losses to 1e-4
    _assert_same_weights(out, single[0], atol=1e-4)


def test_gradient_accumulation_and_activation_checkpointing_change_nothing(work, single):
    out = work / "accum"
    losses = _run(work, out, 1, grad_accum=4, activation_checkpointing=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single[1]), atol=2e-4, rtol=0)  # the record rounds losses to 1e-4
    _assert_same_weights(out, single[0], atol=1e-4)


def test_a_killed_run_resumes_on_another_number_of_processes(work, single):
    """Killed after its first train state (2 processes), resumed alone: the weights of the uninterrupted run."""
    out = work / "killed"
    p = _run(work, out, 2, wait=False, checkpoint_every=1)
    state = out / "train_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if state.is_file():
            steps = torch.load(state, weights_only=True)["step"]
            if steps >= 1:
                break
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert state.is_file() and not (out / "model.safetensors").exists(), "the run finished before it was killed"
    _run(work, out, 1, checkpoint_every=1)
    _assert_same_weights(out, single[0], atol=1e-4)
    assert not state.exists()


def test_backbone_pretraining_on_two_processes_matches_one(work):
    one = _run(work, work / "pre1", 1, pretrain=True)
    two = _run(work, work / "pre2", 2, pretrain=True)
    assert len(one) == 8
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=2e-4, rtol=0)
    from safetensors.torch import load_file

    a, b = (load_file(str(work / d / "vit-test.safetensors")) for d in ("pre1", "pre2"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)


def test_bf16_autocast_trains_near_fp32(work, single):
    losses = _run(work, work / "bf16", 1, precision="bf16")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - single[1][0]) < 0.05 * single[1][0]


def test_lora_trains_adapters_and_saves_a_merged_lm(work, single):
    from toolkit.vlm import VLM

    out = work / "lora"
    losses = _run(work, out, 1, lora_r=4)
    assert losses[-1] < losses[0]
    lora, full = _weights(out), _weights(single[0])
    assert lora.keys() == full.keys() and not any("lora" in k for k in lora)  # merged: the plain LM's keys
    vlm = VLM.load(out)
    assert not any("lora" in n for n, _ in vlm.lm.named_parameters())


def test_batches_that_do_not_split_are_refused(work):
    out = work / "odd"
    p = _run(work, out, 1, wait=False, grad_accum=3)
    log, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "make the stage's batch_size a multiple of 3" in log


@pytest.mark.slow
def test_the_main_job_runs_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m toolkit.cli demo`: rank 0 makes the data, backbones and LM, both ranks train
    the VLMs, rank 0 evaluates and reports."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit.cli",
           "demo", "--preset", "smoke", "--backbones", "vit-test,vmamba-test", "--runs", str(tmp_path / "runs"),
           "--cache", str(tmp_path / "cache"), "--no-figures", "--threads", "1", "--set", "train.strategy=fsdp"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    run = tmp_path / "runs" / "smoke"
    rec = json.loads((run / "vlms" / "vmamba-test" / "train_record.json").read_text())
    assert rec["processes"] == 2 and (run / "results.csv").is_file()
    assert p.stdout.count("Report:") == 1  # one rank reports
