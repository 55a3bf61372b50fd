"""The LoRA gradients of each stack against the fp32 reference (same weights, same row, same adapters).

Run on the GPU: python3 tests/gpu/loss_probe.py OUT.json [ARCH] [B_STD]  (default Llama-3.1-8B shape, one 2048-token
row of the bench text). B_STD 0: the adapters as initialized (lora_B zero, so lora_A's gradient is zero); B_STD > 0:
every lora_B set to the same seeded normal values of that scale, as after a few optimizer steps.
"""
import dataclasses
import json
import sys
from contextlib import nullcontext

import torch

from qlora_engine.bench import speed
from qlora_engine.model import lm_loss
from qlora_engine.training import loop

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B_STD = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0


def grads_after_one_backward(stack, model_config, cfg, rows):
    base = speed.build_base(stack, model_config, cfg, DEVICE)
    if stack.startswith("plain"):
        model = speed.plain_peft_model(stack, base, cfg)
        context = speed.set_plain_precision(stack, model, cfg)
        batch = loop.collate(rows, 0, DEVICE)
    else:
        run = dataclasses.replace(cfg, **speed.ENGINE_SWITCHES[stack])
        model = loop.attach_lora(base, run)
        context = nullcontext()
        batch = loop.micro_batch(rows, run, 0, DEVICE)
    if B_STD:
        generator = torch.Generator().manual_seed(0)
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=generator) * B_STD)
    init = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    with context:
        if stack.startswith("plain"):
            loss = model(**batch).loss
        else:
            loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch), chunked=run.chunked_loss)
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    del model, base
    torch.cuda.empty_cache()
    return float(loss), init, grads


def main(out_path):
    model_config = json.loads(speed._model_config_path(sys.argv[2] if len(sys.argv) > 2 else "llama-3.1-8b")
                              .read_text())
    cfg = speed.bench_config(DEVICE, 2048)
    rows = speed.workload_rows("fixed", 1, 2048, [])[0]
    results = {stack: grads_after_one_backward(stack, model_config, cfg, rows)
               for stack in ("plain_fp32", "plain", "engine", "engine_baseline")}
    plain_loss, plain_init, plain_grads = results["plain_fp32"]  # the reference
    report = {}
    for stack, (loss, init, grads) in results.items():
        init_diff = max(float((init[n] - plain_init[n]).abs().max()) for n in plain_init)
        report[stack] = {"loss": loss, "lora_init_max_abs_diff": init_diff,
                         "grad_norm": float(torch.stack([g.norm() for g in grads.values()]).norm())}
        for part in ("lora_A", "lora_B"):
            names = [n for n in plain_grads if part in n and plain_grads[n].norm() > 0]
            if not names:
                continue
            rel = sorted(float((grads[n] - plain_grads[n]).norm() / plain_grads[n].norm()) for n in names)
            flat, reference = (torch.cat([g[n].flatten() for n in names]) for g in (grads, plain_grads))
            report[stack][part] = {
                "rel_diff_median": rel[len(rel) // 2], "rel_diff_max": rel[-1],
                "rel_diff_all": float((flat - reference).norm() / reference.norm()),
                "norm_ratio": float(flat.norm() / reference.norm()),
                "sign_agreement": float((flat.sign() == reference.sign()).float().mean())}
        print(stack, json.dumps(report[stack]), flush=True)
    with open(out_path, "w") as out:
        json.dump(report, out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
