#!/usr/bin/env bash
# The CUDA suite and the fp16 curve after the chunked loss's fp16 fix, on the lent GPU, in one call:
#   pytest -m gpu tests/gpu tests/faults -k "not smollm2"   (CUDA kernels, engine runs, resume, adapter inits, FSDP
#                                                          on one rank, real OOM)
#   bench --speed fp16 engine,plain then bf16 engine,plain (50 fixed 2048-token rows, Llama-3.1-8B shape), so the
#   fp16 curves are held against the bf16 ones of the same machine and code.
# The machine lacks bitsandbytes and platformdirs: they travel unpacked in .whl/site (bitsandbytes 0.50.2 with only
# libbitsandbytes_cpu.so and _cuda130.so kept; see device_run.sh for the download line). Usage, in the repo root:
#   bash tests/gpu/fp16_run.sh          (device: carry [".whl"], timeout_s 600)
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH="$PWD/.whl/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$out/versions.txt"
step() {  # name, timeout, command...
  local name=$1 limit=$2 began=$(date +%s)
  shift 2
  echo "=== $name (timeout $limit s): $*" | tee -a "$out/commands.txt"
  timeout -k 10 "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "=== $name: exit $? after $(($(date +%s) - began)) s" | tee -a "$out/commands.txt"
  grep -v -i -E "warn|^\s*$" "$out/$name.txt" | tail -40
}
step pytest-gpu 250 python3 -m pytest -m gpu tests/gpu tests/faults -k "not smollm2" -p no:cacheprovider -q -rA
bench="python3 -m qlora_engine bench --speed --model llama-3.1-8b --workloads fixed --steps 50 --warmup 4 --stacks engine,plain"
step fp16-fixed-50 140 $bench --compute-dtype fp16 --out "$out/fp16-fixed-50.json"
step bf16-fixed-50 150 $bench --out "$out/bf16-fixed-50.json"
