export PYTHONPATH="$PWD/.whl/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout -k 5 150 python3 -m pytest -m gpu tests/gpu/test_fsdp_cuda.py tests/faults/test_cuda_oom.py -p no:cacheprovider -q -rA 2>&1 | grep -v -E "DEBUG|^\s*$" | tail -30 | tee $OUT/pytest-rerun.txt
GRID=probe WHL=.whl BUDGET_S=400 bash tests/gpu/memory_run.sh
