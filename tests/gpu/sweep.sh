#!/usr/bin/env bash
# Learning-rate / schedule sweep on the sample facts (40 steps, effective batch 8), base vs tuned accuracy.
set -uo pipefail
for variant in "--learning-rate 5e-4 --lr-scheduler cosine" "--learning-rate 3e-4 --lr-scheduler constant" \
               "--learning-rate 1e-3 --lr-scheduler cosine"; do
  run=/tmp/sweep-$(echo "$variant" | tr -c 'a-z0-9' '_')
  python3 -m qlora_engine train --max-steps 40 --eval-steps 20 --compare-questions 100 --device cuda \
    --run-dir "$run" $variant --events jsonl 2>/dev/null \
    | python3 -c "
import json, sys
events = [json.loads(l) for l in sys.stdin if l.startswith('{')]
evals = [e['eval_loss'] for e in events if e['kind'] == 'eval']
comparison = [e for e in events if e['kind'] == 'comparison']
c = comparison[0] if comparison else {}
print('SWEEP', '$variant', 'eval', evals, 'base', c.get('base_accuracy'), 'tuned', c.get('tuned_accuracy'), events[-1]['kind'])"
done
