#!/usr/bin/env bash
# Issue 21's data-parallel measurement on an nvidia-h200-x2 machine, in one command: `bench --speed --nproc 2` on the
# Llama-3.1-8B shape at 2048 tokens runs the engine in one process (1 row a step), in one process at 2 rows a step
# (the loss reference) and in two processes through torchrun + nccl (1 row each, 2 a step), and reports tokens/s of
# each, the speed-up (goal >= 1.8x) and the two-process loss curve against the reference (goal: within 1%).
# LAYOUT=fsdp runs the same with the two processes sharded (parallel: fsdp, bench --fsdp).
# tests/gpu/ddp_h200x2/COMMANDS.md has the exact device call.
# The machine's Python lacks bitsandbytes and platformdirs: they travel as wheels in .whl (in the repo root):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 platformdirs==4.14.9
# Usage, from a snapshot of the tree: WHL=<.whl> [STEPS=50] [BUDGET_S=560] bash tests/gpu/ddp_run.sh
# (a try-out of the script on the CPU, gloo: DEVICE=cpu MODEL=<config.json of a tiny model> MAX_LENGTH=64 STEPS=4)
# Writes under $OUT: versions.txt, ddp-fixed.json (every run, and "ddp": the comparison), ddp-fixed.txt (the
# tables), ddp-fixed.full.log (everything the bench printed).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
whl=${WHL:-.whl}
site=/tmp/ddp-site
# NVLink multicast stays off (the machine's notes: using it can put the host's GPUs out of service); torchrun's ranks
# inherit these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f $site/.installed ]; then  # kept while the machine stays warm
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site "$whl"/*.whl \
    || exit 1
  touch $site/.installed
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None, 'gpus', torch.cuda.device_count())"
  env | grep -E "^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)="
} 2>&1 | tee "$out/versions.txt"
device=${DEVICE:-cuda}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$device" = cuda ] && [ "$gpus" -lt 2 ]; then
  echo "two GPUs needed, this machine has $gpus" | tee -a "$out/versions.txt"
  exit 1
fi
# LAYOUT=fsdp: the two-process run shards each decoder layer (bench --fsdp); results under fsdp-fixed.*
name=${LAYOUT:-ddp}-fixed
layout=()
[ "${LAYOUT:-ddp}" = fsdp ] && layout=(--fsdp)
began=$(date +%s)
timeout -k 10 "${BUDGET_S:-560}" python3 -m qlora_engine bench --speed --device "$device" \
  --model "${MODEL:-llama-3.1-8b}" --stacks engine --workloads fixed --max-length "${MAX_LENGTH:-2048}" \
  --steps "${STEPS:-50}" --warmup 4 --nproc 2 "${layout[@]}" --out "$out/$name.json" 2>&1 \
  | tee "$out/$name.full.log" | grep -v -i -E "warn|^\s*$" > "$out/$name.txt"
echo "exit ${PIPESTATUS[0]} after $(($(date +%s) - began)) s" | tee -a "$out/$name.txt"
tail -4 "$out/$name.txt"
