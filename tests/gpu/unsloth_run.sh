#!/usr/bin/env bash
# Issue 19 on this workplace's lent GPU: the engine side by side with the plain HF QLoRA stack and Unsloth's
# documented QLoRA recipe (`bench --speed --stacks ...,unsloth`), bf16 and fp16, and with the newest transformers 5.x.
# The GPU machine has no network and lacks bitsandbytes, Unsloth and what Unsloth needs: they travel in .whl
# (in the repo root; WHL=... for another folder):
#   D="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   $D -d .whl trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0 \
#      cut-cross-entropy==25.1.1 msgspec==0.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#      typing-inspection==0.4.5 platformdirs==4.14.9
#   .whl/site/: unsloth 2026.10.9 (its unsloth/ package only: the wheel's studio/ app is 80 MB), unsloth_zoo
#      2026.10.9 (with unsloth_zoo_downloads/), bitsandbytes 0.50.2 (only libbitsandbytes_cpu.so and _cuda130.so),
#      all unpacked; xformers, flash-attn and torchao are left out (Unsloth then uses PyTorch's SDPA attention)
#   $D -d .whl/tf transformers==5.24.0 regex==2026.11.19      (stage tf-newest only)
# Usage: BUDGET_S=570 bash tests/gpu/unsloth_run.sh STAGE     (STAGE: fixed-fp16 | long | variable-tf | fixed-repeat | budget | speed2)
# Each bench writes its JSON after every stack, so a run cut short by its timeout keeps what finished; everything
# lands in /tmp/issue19-res/STAGE and comes back as one archive, $OUT/results-STAGE.tgz.
set -uo pipefail
stage=$1
out=${OUT:-/tmp/out}
res=/tmp/issue19-res/$stage  # outside $OUT: only 8 files come back from it, so they travel as one archive
rm -rf "$res" && mkdir -p "$res" "$out"
start=$(date +%s)
budget=${BUDGET_S:-570}
whl=${WHL:-.whl}
site=/tmp/site
left() { echo $((budget - ($(date +%s) - start))); }

if [ ! -f $site/.issue19-installed ]; then  # kept while the machine stays warm
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site "$whl"/*.whl \
    || exit 1
  cp -r "$whl"/site/. $site/ && touch $site/.issue19-installed
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1 QLORA_BENCH_UNSLOTH_MODELS=/tmp/qlora-bench-unsloth

versions() {  # $1: file name
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 - <<'EOF'
import importlib.metadata as m
for name in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton", "tokenizers", "huggingface_hub",
             "safetensors", "trl", "datasets", "unsloth", "unsloth_zoo", "cut_cross_entropy", "xformers", "flash_attn",
             "torchao", "fsspec", "pydantic"]:
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "absent")
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
  } 2>&1 | tee "$res/$1"
}

bench() {  # $1: result name, $2: longest it may take (s); the rest: bench arguments
  local name=$1 cap=$2 t
  shift 2
  t=$(($(left) - 20))
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 60 ]; then
    echo "SKIPPED $name: $t s left" | tee -a "$res/skipped.txt"
    return
  fi
  echo "=== $name (timeout $t s): python3 -m qlora_engine bench --speed $* --out $name.json" | tee -a "$res/commands.txt"
  local began=$(date +%s)
  timeout -k 10 "$t" python3 -m qlora_engine bench --speed "$@" --out "$res/$name.json" 2>&1 \
    | tee "$res/$name.full.log" | grep -v -i -E "warn|^\s*$" > "$res/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(($(date +%s) - began)) s" | tee -a "$res/commands.txt"
  grep -v '^{' "$res/$name.txt" | tail -40
}

model=(--model llama-3.1-8b)
case "$stage" in
  fixed-fp16)  # the issue's fixed rows, then fp16 forced
    versions versions.txt
    bench fixed-50-plain-engine-unsloth 420 "${model[@]}" --stacks plain,engine,unsloth --workloads fixed \
      --steps 50 --warmup 4
    bench fp16-fixed-50-engine 160 "${model[@]}" --stacks engine --workloads fixed --steps 50 --warmup 4 \
      --compute-dtype fp16
    bench fp16-fixed-50-plain-unsloth 200 "${model[@]}" --stacks plain,unsloth --workloads fixed --steps 50 \
      --warmup 4 --compute-dtype fp16 ;;
  long)  # long rows as on 24 GiB and 12 GiB cards
    bench long-24gib-engine-unsloth 300 "${model[@]}" --stacks engine,unsloth --workloads long \
      --lengths 4096,8192,16384,32768 --gpu-memory-gib 24
    bench long-12gib-engine-unsloth 260 "${model[@]}" --stacks engine,unsloth --workloads long \
      --lengths 4096,6144,8192,12288,16384 --gpu-memory-gib 12 ;;
  variable-tf)  # the 12 GiB card again (allocator capped once the model is built), variable-length rows, then the
    # fixed rows with the newest transformers 5.x
    bench long-12gib-capped-after-build-engine-unsloth 200 "${model[@]}" --stacks engine,unsloth --workloads long \
      --lengths 4096,6144,8192,12288,16384 --gpu-memory-gib 12
    bench variable-16-plain-engine-unsloth 330 "${model[@]}" --stacks plain,engine,unsloth --workloads variable \
      --steps 16 --warmup 4
    if [ -d "$whl/tf" ]; then
      rm -rf /tmp/site-tf && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site-tf "$whl"/tf/*.whl
      PYTHONPATH="/tmp/site-tf:$PYTHONPATH" versions versions-transformers-newest.txt
      PYTHONPATH="/tmp/site-tf:$PYTHONPATH" bench tf-newest-fixed-50-plain-engine 240 "${model[@]}" \
        --stacks plain,engine --workloads fixed --steps 50 --warmup 4
    fi ;;
  budget)  # where the engine's step time goes now (profile), and the compiled backward allowed to keep more of
    # each layer's activations instead of recomputing them (activation_memory_budget), next to Unsloth in one session
    bench amb-fixed-50-engine-variants-unsloth 540 "${model[@]}" --workloads fixed --steps 50 --warmup 4 \
      --profile engine --stacks engine,engine@activation_memory_budget=0.1,engine@activation_memory_budget=0.25,\
engine@activation_memory_budget=0.5,engine@activation_memory_budget=1.0,unsloth ;;
  speed2)  # in one session: the activation memory budget and the fused AdamW (one kernel for every LoRA tensor,
    # where the paged 8-bit optimizer launches one per tensor from Python), each alone and together, then fp16 with
    # the engine's loss scaling next to the plain stack's
    bench speed2-fixed-50 480 "${model[@]}" --workloads fixed --steps 50 --warmup 4 \
      --stacks plain,engine,engine@activation_memory_budget=0.25,engine@optimizer=adamw,\
engine@optimizer=adamw+activation_memory_budget=0.25,unsloth
    bench speed2-fp16-fixed-50 200 "${model[@]}" --workloads fixed --steps 50 --warmup 4 --compute-dtype fp16 \
      --stacks engine,plain ;;
  fixed-repeat)  # the fixed rows once more: this machine's speed varies from run to run
    bench fixed-50-plain-engine-unsloth-repeat 280 "${model[@]}" --stacks plain,engine,unsloth --workloads fixed \
      --steps 50 --warmup 4 ;;
esac
tar czf "$out/results-$stage.tgz" -C "$res" .
echo "stage $stage done in $(($(date +%s) - start)) s"
