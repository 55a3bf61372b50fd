"""`qlora-studio bench --adapters`: adapter starts, variants and precision budgets side by side on one model and data.

For each variant (same seed, data and steps): the mean relative Frobenius error of the linear weights at step 0
(||W - (dequant(base) + s B A)|| / ||W||, so a LoftQ or PiSSA start counts what it corrects), the step-0 eval loss
against the 16-bit model's, the eval loss after the steps, held-out accuracy (the sample set's keyword score),
trainable parameters, the bytes the linear weights are held in, and the process' peak RSS. Each variant runs in its
own process (the RSS is its own).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "qlora": {}, "loftq-1": {"init_lora": "loftq"}, "loftq-5": {"init_lora": "loftq", "loftq_iters": 5},
    "pissa": {"init_lora": "pissa"}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True},
    "budget-4.25": {"precision_budget_bits": 4.25}, "budget-4.5": {"precision_budget_bits": 4.5},
}
# Pinned, not the defaults: a default that changes between two variants' runs would confound them.
BASE_OPTIONS = {"model": "default", "data": "sample", "max_steps": 40, "seed": 42, "eval_steps": 0,
                "compare_questions": 36, "device": "cpu", "compile_layers": False, "optimizer": "paged_adamw_8bit",
                "lora_r": 16, "lora_alpha": 32, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3}


def weight_error_and_bytes(model: Any) -> tuple[float, int]:
    """Mean relative error of the effective linear weights against the checkpoint's, and their stored bytes."""
    import torch

    from qlora_engine.model import adapter_init, weight_formats

    folder = Path(model.get_base_model().name_or_path)
    errors, stored = [], 0
    with torch.no_grad():
        for name, layer in adapter_init.lora_layers(model).items():
            base = layer.get_base_layer()
            original = adapter_init.original_weight(folder, name).float()
            effective = weight_formats.dequantize_layer(base)
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            effective = effective + layer.scaling["default"] * (lora_b.float() @ lora_a.float())
            errors.append(float((original - effective).norm() / original.norm()))
            fmt = weight_formats.layer_format(base)
            rows, cols = original.shape
            stored += fmt.bits(rows, cols, getattr(base.weight, "compress_statistics", False)) // 8
    return sum(errors) / len(errors), stored


def run_variant(name: str, train: bool = True) -> dict[str, Any]:
    """One variant's numbers; without `train`, only what step 0 shows (the quantization error and its loss)."""
    import torch

    from qlora_engine.model import loading, packing
    from qlora_engine.protocol.config import RunConfig
    from qlora_engine.protocol.events import EventWriter, read_events
    from qlora_engine.training import loop

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict({**BASE_OPTIONS, **VARIANTS[name]})
    source = loading.resolve_model(cfg.model)
    tokenizer = loading.load_tokenizer(source.path)
    prepared = loop.prepare_data(cfg, tokenizer)
    dtype = loading.resolve_compute_dtype(cfg.compute_dtype, "cpu")
    row: dict[str, Any] = {"variant": name, "options": VARIANTS[name], "steps": cfg.max_steps if train else 0}
    with tempfile.TemporaryDirectory() as scratch:
        probe_dir = Path(scratch) / "probe"
        probe_dir.mkdir()
        loop.seed_everything(cfg.seed)
        probe = loop.build_model(cfg, source.path, "cpu", dtype, probe_dir)
        error, stored_bytes = weight_error_and_bytes(probe)
        row.update(weight_relative_error=round(error, 5), linear_weight_bytes=stored_bytes,
                   trainable_params=sum(p.numel() for p in probe.parameters() if p.requires_grad),
                   eval_loss_step0=round(loop.evaluate(probe, prepared.val_examples, cfg, tokenizer.pad_token_id,
                                                       "cpu"), 5))
        del probe
        full = loading.load_plain_model(source.path, dtype=dtype)
        packing.use_packed_attention(full, cfg.max_length)  # as the trained model: packed rows attend to themselves
        row["eval_loss_16bit"] = round(loop.evaluate(full, prepared.val_examples, cfg, tokenizer.pad_token_id,
                                                     "cpu"), 5)
        del full
        if train:
            run_dir = Path(scratch) / "run"
            events = EventWriter(run_dir / "events.jsonl", stream=None)
            result = loop.run_training(cfg, run_dir, events)
            events.close()
            evals = [e for e in read_events(run_dir / "events.jsonl") if e.kind == "eval"]
            comparison = result.get("comparison") or {}
            row.update(eval_loss_final=evals[-1].eval_loss, heldout_accuracy=comparison.get("tuned_accuracy"),
                       base_accuracy=comparison.get("base_accuracy"))
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def adapters_main(out: Path, only: list[str] | None = None, train: bool = True) -> int:
    """Every variant in its own process, one JSON line each appended to `out` (print the table with --table)."""
    failures = 0
    for name in only or list(VARIANTS):
        done = subprocess.run([sys.executable, "-m", "qlora_engine.bench.adapters", "--variant", name]
                              + ([] if train else ["--step0"]), capture_output=True, text=True)
        if done.returncode != 0:
            failures += 1
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        line = done.stdout.strip().splitlines()[-1]
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        print(line, flush=True)
    return 1 if failures else 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README table; the 16-bit model's eval loss (one number for every variant) goes in the text above it."""
    lines = ["| variant | weight error (mean rel. Frobenius) | eval loss at step 0 | eval loss after the steps "
             "| held-out accuracy | trainable params | linear weights | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trained = "eval_loss_final" in r
        accuracy = "n/a" if r.get("heldout_accuracy") is None else f"{r['heldout_accuracy']:.0%}"
        final = f"{r['eval_loss_final']:.4f} ({r['steps']})" if trained else "not run"
        lines.append(f"| {r['variant']} | {r['weight_relative_error']:.4f} | {r['eval_loss_step0']:.4f} "
                     f"| {final} | {accuracy if trained else 'not run'} "
                     f"| {r['trainable_params']:,} | {r['linear_weight_bytes'] / 2**20:.1f} MiB "
                     f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_engine.bench.adapters", description=__doc__)
    parser.add_argument("--variant", choices=list(VARIANTS))
    parser.add_argument("--out", default="bench-adapters.jsonl")
    parser.add_argument("--only", help="comma list of variants")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out")
    parser.add_argument("--step0", action="store_true", help="only what step 0 shows: no training (minutes, not hours "
                        "on a shared CPU)")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, train=not args.step0)))
        return 0
    if args.table:  # --out may name several files (comma list): a variant's later rows complete its earlier ones
        merged: dict[str, dict[str, Any]] = {}
        for file in args.out.split(","):
            for line in Path(file).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    merged.setdefault(row["variant"], {}).update(row)
        print(markdown_table([merged[name] for name in VARIANTS if name in merged]), end="")
        return 0
    return adapters_main(Path(args.out), args.only.split(",") if args.only else None, train=not args.step0)


if __name__ == "__main__":
    sys.exit(main())
