#!/usr/bin/env bash
# Optional packages that need special install steps (see README, "Installing"). Idempotent.
set -euo pipefail
PIP=${PIP:-pip}
for f in "$(dirname "$0")"/install.d/*.sh; do
  [ -e "$f" ] || continue
  PIP="$PIP" bash "$f"
done
