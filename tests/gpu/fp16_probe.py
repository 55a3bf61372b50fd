"""Where fp16 overflows: one scaled backward per stack at the loss scale a run starts with, same weights and row.

The engine's fp16 run skipped its first step (its gradients overflowed at GradScaler's starting scale, 2^16) where
the plain stack's did not, and its curve then strayed from bf16 more than the plain stack's. This finds the first
tensor that is not finite: each decoder layer's output in the forward, the gradient reaching it in the backward
(largest magnitude too), and the LoRA gradients, for the engine with each of its precision switches and the plain
stack.

Run on the GPU: python3 tests/gpu/fp16_probe.py OUT.json [ARCH] [LENGTH] [STACKS]
(default Llama-3.1-8B shape, one 2048-token row of the bench text, stacks plain,engine,engine_eager,
engine_bf16_residual,engine_unfused,engine_baseline). On the CPU the same runs eagerly (small ARCH and LENGTH).
"""
import dataclasses
import gc
import json
import math
import sys
import time

import torch

from qlora_engine.bench import speed
from qlora_engine.model import layer_compile, lm_loss
from qlora_engine.protocol.config import RunConfig
from qlora_engine.training import loop

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALES = (2.0**16, 2.0**15)
STACKS = "plain,engine,engine_eager,engine_bf16_residual,engine_unfused,engine_baseline"


def watch_layers(layers: list[torch.nn.Module], record: dict[str, list]) -> list:
    """Forward hooks: each layer's output's largest magnitude, and a tensor hook for the gradient reaching it."""
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, output, index=index):
            hidden = output[0] if isinstance(output, tuple) else output
            record["forward"].append((index, float(hidden.detach().abs().max())))
            if hidden.requires_grad:
                hidden.register_hook(lambda grad, index=index: record["backward"].append(
                    (index, float(grad.detach().float().abs().max()))))
        handles.append(layer.register_forward_hook(hook))
    return handles


def probe(stack: str, model_config: dict, cfg: RunConfig, rows: list) -> dict:
    base = speed.build_base(stack, model_config, cfg, DEVICE)
    switches = speed.engine_switches(stack)
    if switches is None:
        model = speed.plain_peft_model(stack, base, cfg)
        context = speed.set_plain_precision(stack, model, cfg)
        batch = loop.collate(rows, 0, DEVICE)
        run = cfg
    else:
        run = dataclasses.replace(cfg, optimizer=RunConfig().optimizer, **switches).validate()
        model = loop.attach_lora(base, run)
        context = None
        batch = loop.micro_batch(rows, run, 0, DEVICE)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    compiled = run.compile_layers and DEVICE == "cuda"
    layers = layer_compile.decoder_layers(model)
    result = {"stack": stack, "scales": {}}
    for scale in SCALES:
        record = {"forward": [], "backward": []}
        handles = [] if compiled else watch_layers(layers, record)  # hooks inside compiled layers would break them
        began = time.time()
        if context is None:
            loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch), chunked=run.chunked_loss)
        else:
            with context:
                loss = model(**batch).loss
        (loss * scale).backward()
        for handle in handles:
            handle.remove()
        bad = sorted(name for name, p in trainable.items()
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
        finite = [float(p.grad.float().abs().max()) for p in trainable.values()
                  if p.grad is not None and bool(torch.isfinite(p.grad).all())]
        backward = sorted(record["backward"], key=lambda item: item[0])
        result["scales"][f"{scale:g}"] = {
            "loss": float(loss.detach()), "seconds": round(time.time() - began, 1),
            "nonfinite_grads": len(bad), "first_nonfinite": bad[:8],
            "largest_finite_scaled_grad": max(finite) if finite else None,
            "unscaled_grad_norm": math.sqrt(sum(float(p.grad.float().div(scale).pow(2).sum())
                                                for p in trainable.values() if p.grad is not None)),
            "layer_output_max": [round(v, 2) for _, v in sorted(record["forward"])],
            "layer_grad_max": [v for _, v in backward],
            "first_nonfinite_layer_grad": next((i for i, v in reversed(backward) if not math.isfinite(v)), None)}
        for p in trainable.values():
            p.grad = None
        print(stack, f"scale {scale:g}", json.dumps({k: v for k, v in result["scales"][f"{scale:g}"].items()
                                                     if not k.startswith("layer_")}), flush=True)
    del model, base, trainable, batch
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def main(out_path: str) -> None:
    arch = sys.argv[2] if len(sys.argv) > 2 else "llama-3.1-8b"
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    stacks = (sys.argv[4] if len(sys.argv) > 4 else STACKS).split(",")
    model_config = json.loads(speed._model_config_path(arch).read_text())
    cfg = speed.bench_config(DEVICE, length, compute_dtype="fp16")
    rows = speed.workload_rows("fixed", 1, length, [])[0]
    results = []
    for stack in stacks:
        results.append(probe(stack, model_config, cfg, rows))
        with open(out_path, "w") as handle:  # after every stack: a run cut short keeps what finished
            json.dump({"arch": arch, "length": length, "device": DEVICE, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
