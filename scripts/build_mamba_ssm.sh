#!/usr/bin/env bash
# Build mamba-ssm's CUDA selective-scan extension for ONE GPU architecture (default: this GPU's), so that the
# benchmark can compare against it (backend="mamba"). The release builds for ~9 architectures (tens of minutes);
# one takes about 2 minutes on 16 cores. Needs nvcc matching torch's CUDA major version.
#   bash scripts/build_mamba_ssm.sh [sdist.tar.gz]      (else the sdist in .whl/, else PyPI)
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=2.3.2.post1
SDIST=${1:-.whl/mamba_ssm-$VERSION.tar.gz}
if $PY -c "import torch, selective_scan_cuda" 2>/dev/null; then echo "selective_scan_cuda already built"; exit 0; fi
ARCH=${MAMBA_ARCH:-$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")}
WORK=$(mktemp -d)
if [ ! -f "$SDIST" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mamba-ssm==$VERSION" -d "$WORK"
  SDIST=$(ls "$WORK"/mamba_ssm-*.tar.gz)
fi
tar xzf "$SDIST" -C "$WORK"
SRC=$(ls -d "$WORK"/mamba_ssm-*/)
# keep only the one architecture: replace the list of -gencode flags just before the compile-args block
$PY - "$SRC/setup.py" "$ARCH" <<'PYEOF'
import sys
path, arch = sys.argv[1], sys.argv[2]
s = open(path).read()
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert marker in s, "unexpected setup.py layout"
s = s.replace(marker, f'    cc_flag = [f for f in cc_flag if not f.startswith(("-gencode", "arch="))] + '
                      f'["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n' + marker, 1)
open(path, "w").write(s)
PYEOF
MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -q "$SRC"
$PY -c "import torch, selective_scan_cuda; print('selective_scan_cuda built for sm_$ARCH')"
