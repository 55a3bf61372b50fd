#!/usr/bin/env bash
# Issue 20 on the lent GPU: `bench --memory --grid consumer` (51 configurations, each its own process, the allocator
# capped at the card's 8-24 GiB, 8 processes sharing the GPU at once). The machine lacks bitsandbytes: it travels
# unpacked in .whl/site (see unsloth_run.sh). Usage, from a copy of the tree: WHL=<.whl> bash tests/gpu/memory_run.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
whl=${WHL:-.whl}
[ -d /tmp/msite/platformdirs ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/msite \
  "$whl"/platformdirs-*.whl
# the precision budget's solver (scipy's milp): from a wheel where the image lacks scipy
if ! python3 -c "import scipy.optimize" 2>/dev/null && [ ! -d /tmp/msite/scipy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/msite "$whl"/scipy-*.whl
fi
export PYTHONPATH="/tmp/msite:$whl/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/versions.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$out/versions.txt"
began=$(date +%s)
grid=${GRID:-consumer}
timeout -k 10 "${BUDGET_S:-540}" python3 -m qlora_engine bench --memory --grid "$grid" --parallel "${PARALLEL:-8}" \
  --out "$out/memory-$grid.jsonl" 2>&1 | grep -v -i -E "warn|^\s*$" | tee "$out/memory-$grid.txt"
echo "exit ${PIPESTATUS[0]} after $(($(date +%s) - began)) s" | tee -a "$out/memory-$grid.txt"
# a run cut short by the timeout leaves its finished rows in the parts folder
[ -d "$out/.memory-$grid.jsonl.parts" ] && tar czf "$out/memory-$grid-parts.tgz" -C "$out" ".memory-$grid.jsonl.parts" \
  && rm -rf "$out/.memory-$grid.jsonl.parts"
