#!/usr/bin/env bash
# Issue 7, item 2 (attention) on a CUDA machine, in one command:
#   bash bench/attention_gpu.sh [WHEEL_DIR ...]
# 1. optionally installs flash-attn-4 and its dependencies from local wheel folders (for a
#    machine without network; a wheel split into NAME.whl.part.aa, .ab, ... across the
#    folders is put back together first) into /tmp/fa4site, for this run only;
# 2. installs this checkout (no dependencies) so vitok_fast imports;
# 3. runs the attention tests, the CUDA ones included (tests/test_attention_cuda.py);
# 4. runs bench/bench_attention.py -> bench/results/attention_<gpu>.json and .png.
# The benchmark runs even if a test fails (its JSON records per-backend errors); the script's
# exit status is the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [ $# -gt 0 ]; then
    wheels=$(mktemp -d)
    for dir in "$@"; do cp "$dir"/* "$wheels"/ || exit 1; done
    for first in "$wheels"/*.whl.part.aa; do
        [ -e "$first" ] || continue
        whole="${first%.part.aa}"
        cat "$whole".part.* > "$whole" && rm "$whole".part.*
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site "$wheels"/*.whl || exit 1
    # nvidia-cutlass-dsl puts its packages on sys.path with a .pth file, which --target skips
    export PYTHONPATH="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
fi

# this checkout's vitok_fast (kernels/ maps to vitok_fast.kernels: it needs installing)
python3 -c "import os, sys, vitok_fast.kernels as k
sys.exit(0 if os.path.samefile(os.path.dirname(os.path.dirname(k.__file__)), '.') else 1)" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || python3 -m pip install -q --no-deps -e . || exit 1
python3 - <<'EOF'
import torch
from vitok_fast import attention
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version())
print("flash-attn-4 importable:", attention.fa4_available(), attention._fa4_import()[1] or "")
EOF
python3 -m pytest tests/test_attention.py tests/test_attention_cuda.py -q -rs --benchmark-disable
status=$?
python3 bench/bench_attention.py
exit $status
