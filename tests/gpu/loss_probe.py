"""The first step's LoRA gradients of each stack against the fp32 reference (same weights, same row, same init).

Run on the GPU: python3 tests/gpu/loss_probe.py OUT.json  (Llama-3.1-8B shape, one 2048-token row of the bench text)
"""
import dataclasses
import json
import sys
from contextlib import nullcontext

import torch

from qlora_engine import lm_loss, speedbench, train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_after_one_backward(stack, model_config, cfg, rows):
    base = speedbench.build_base(stack, model_config, cfg, DEVICE)
    if stack.startswith("plain"):
        model = speedbench.plain_peft_model(stack, base, cfg)
        context = speedbench.plain_autocast(stack, model, cfg)
        batch = train.collate(rows, 0, DEVICE)
    else:
        run = dataclasses.replace(cfg, **speedbench.ENGINE_SWITCHES[stack])
        model = train.attach_lora(base, run)
        context = nullcontext()
        batch = train.micro_batch(rows, run, 0, DEVICE)
    init = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    with context:
        if stack.startswith("plain"):
            loss = model(**batch).loss
        else:
            loss = lm_loss.causal_lm_loss(model, batch, train.trained_tokens(batch), chunked=run.chunked_loss)
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    del model, base
    torch.cuda.empty_cache()
    return float(loss), init, grads


def main(out_path):
    model_config = json.loads(speedbench._model_config_path(sys.argv[2] if len(sys.argv) > 2 else "llama-3.1-8b")
                              .read_text())
    cfg = speedbench.bench_config(DEVICE, 2048)
    rows = speedbench.workload_rows("fixed", 1, 2048, [])[0]
    results = {stack: grads_after_one_backward(stack, model_config, cfg, rows)
               for stack in ("plain_fp32", "plain", "engine", "engine_eager", "engine_baseline")}
    plain_loss, plain_init, plain_grads = results["plain_fp32"]  # the reference
    report = {}
    for stack, (loss, init, grads) in results.items():
        init_diff = max(float((init[n] - plain_init[n]).abs().max()) for n in plain_init)
        b_names = [n for n in plain_grads if "lora_B" in n]
        rel = [float((grads[n] - plain_grads[n]).norm() / plain_grads[n].norm()) for n in b_names]
        agree = sum(int((grads[n].sign() == plain_grads[n].sign()).sum()) for n in b_names)
        total = sum(plain_grads[n].numel() for n in b_names)
        norm = float(torch.stack([g.norm() for g in grads.values()]).norm())
        report[stack] = {"loss": loss, "lora_init_max_abs_diff": init_diff, "grad_norm": norm,
                         "lora_B_grad_rel_diff_median": sorted(rel)[len(rel) // 2],
                         "lora_B_grad_rel_diff_max": max(rel), "lora_B_grad_sign_agreement": agree / total,
                         "missing": sorted(set(plain_grads) - set(grads))[:3]}
        print(stack, json.dumps(report[stack]), flush=True)
    with open(out_path, "w") as out:
        json.dump(report, out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
