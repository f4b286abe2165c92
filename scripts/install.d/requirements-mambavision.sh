#!/usr/bin/env bash
# The official MambaVision model code (PyPI `mambavision`), for the equivalence test in
# tests/test_backbone_mambavision.py. Needs the project's venv (torch, timm); offline except PyPI; idempotent.
set -euo pipefail
PIP=${PIP:-pip}
# What the two packages below import that the project lacks, and what mamba-ssm's setup.py needs to build
# without isolation (against the venv's torch).
$PIP install -q einops==0.8.2 setuptools wheel packaging
# mamba-ssm: Python sources only, no CUDA extension (the test routes its scan to selective_scan_ref on the CPU).
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $PIP install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
# mambavision pins old timm/transformers/mamba-ssm releases: without dependencies (pip may list those pins as
# conflicts; they are not needed).
$PIP install -q --no-deps mambavision==1.2.0
