#!/usr/bin/env bash
# The speed bench and the CUDA speed-path tests on this workplace's lent GPU, whose Python lacks bitsandbytes,
# liger-kernel and platformdirs: they travel as wheels in .whl/ (see the device notes in tests/gpu/RESULTS.md):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 platformdirs liger-kernel==0.8.5
# Usage: bash tests/gpu/speed_run.sh STAGE [bench arguments...]
set -uo pipefail
stage=$1; shift
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
  python3 -c "import inspect, torch.nn.attention.varlen as v; print('varlen_attn', inspect.signature(v.varlen_attn))"
} 2>&1 | tee "$out/versions.txt"
case "$stage" in
  tests) python3 -m pytest -m gpu tests/gpu/test_speed_paths.py -p no:cacheprovider -q 2>&1 | tail -15 | tee "$out/pytest-speed.txt" ;;
  bench) python3 -m qlora_engine bench --speed "$@" 2>&1 | grep -v -i -E "warn|^\s*$" | tee -a "$out/bench.txt" ;;
esac
