"""Exports of a finished run: the adapter (PEFT format) or a merged 16-bit model, each verified.

Every export is written to a temp folder, reloaded the way a user would load it, its logits on a
fixed prompt compared with the trained model's, and only then renamed into place.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_engine.model import adapter_init, loading, run_base, weight_formats
from qlora_engine.protocol.config import RunConfig, write_text_atomic
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import Exported
from qlora_engine.protocol.run_lock import process_alive
from qlora_engine.training.best_checkpoint import FINAL, choose_adapter
from qlora_engine.training.checkpoints import replace_folder, writing_folder

FIXED_PROMPT = "Tell me one thing you learned, in one sentence."
# Adapter export reloads the same weights: logits must agree to float rounding.
ADAPTER_TOLERANCE = 1e-4
# Merged export: LoRA folded into 16-bit weights changes rounding, not the function. Measured on an H100
# (SmolLM2, bf16): relative L2 0.027, greedy next token equal at 93% of positions; a merge that lost or
# doubled the LoRA update is far outside this.
MERGED_RELATIVE_TOLERANCE = 0.05
MERGED_TOP1_AGREEMENT = 0.9


def run_config(run_dir: Path, checkpoint: str = FINAL) -> RunConfig:
    """The run's config, once the run is known to have the adapter `checkpoint` names (final, best, step-N)."""
    if not (run_dir / "config.yaml").is_file():
        raise EngineError("not_a_run", f"{run_dir} is not a run folder (no config.yaml)",
                          "Pass the folder a training run wrote.")
    choose_adapter(run_dir, checkpoint)
    return RunConfig.load(run_dir / "config.yaml")


def _load_base(cfg: RunConfig, device: str, run_dir: Path) -> tuple[Any, Any, Any]:
    """The base exactly as the run trained on it (its precision plan, the base its adapter start left)."""
    source = loading.resolve_model(cfg.model, cfg.allow_pickle)
    compute_dtype = loading.resolve_compute_dtype(cfg.compute_dtype, device)
    model = run_base.load_trained_base(cfg, source.path, device, compute_dtype, run_dir)
    return model, loading.load_tokenizer(source.path, cfg.trust_remote_code), compute_dtype


def fixed_prompt_logits(model: Any, tokenizer: Any, device: str) -> torch.Tensor:
    from qlora_engine.model.generation import inference_mode
    from qlora_engine.training.data import prompt_text

    encoded = tokenizer(prompt_text(FIXED_PROMPT, tokenizer), add_special_tokens=False, return_tensors="pt").to(device)
    with inference_mode(model):
        return model(**encoded).logits[0].float().cpu()


def compare_logits(kind: str, path: Path, reference: torch.Tensor, exported: torch.Tensor) -> Exported:
    diff = (exported - reference).abs()
    relative = float((exported - reference).norm() / reference.norm())
    agreement = float((exported.argmax(-1) == reference.argmax(-1)).float().mean())
    if kind == "adapter":
        ok, tolerance = float(diff.max()) <= ADAPTER_TOLERANCE, f"max |dlogit| <= {ADAPTER_TOLERANCE}"
    else:
        ok = relative <= MERGED_RELATIVE_TOLERANCE and agreement >= MERGED_TOP1_AGREEMENT
        tolerance = f"relative L2 <= {MERGED_RELATIVE_TOLERANCE} and top-1 agreement >= {MERGED_TOP1_AGREEMENT}"
    return Exported(export=kind, path=str(path), max_abs_logit_diff=round(float(diff.max()), 6),
                    relative_l2=round(relative, 6), top1_agreement=round(agreement, 4), tolerance=tolerance, ok=ok)


def export_run(run_dir: Path, kind: str, out: Path | None = None,
               progress: Callable[[str, float], None] = lambda stage, fraction: None,
               checkpoint: str = FINAL) -> Exported:
    """Write and verify one export of the final adapter or a checkpoint's (`checkpoint`: best, step-N; its exports
    go under exports/step-N/); the folder appears only if verification passed."""
    from peft import PeftModel

    cfg = run_config(run_dir, checkpoint)
    chosen = choose_adapter(run_dir, checkpoint)
    out = out or chosen.exports_dir(run_dir) / kind
    kind_checked = kind
    recover_interrupted_export(out)
    device = loading.resolve_device(cfg.device)
    progress("loading the trained model", 0.1)
    base, tokenizer, compute_dtype = _load_base(cfg, device, run_dir)
    trained = PeftModel.from_pretrained(base, chosen.folder)
    reference = fixed_prompt_logits(trained, tokenizer, device)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    # a full disk, an unwritable destination: no partial export is left behind
    with writing_folder(tmp, f"the {kind} export", out.parent,
                        "export again; an earlier export there is left as it was"):
        if kind == "adapter" and run_base.adapter_is_residual(run_dir):
            # PiSSA / OLoRA: the adapter holds part of the weights, so alone it means nothing over the originals;
            # exported as peft's converted rank-2r LoRA over them, checked there (16-bit, as peft's conversion)
            progress("converting the adapter to a LoRA over the original weights", 0.4)
            adapter_init.adapter_over_original(chosen.folder, run_dir / adapter_init.INIT_FILE, tmp)
            tokenizer.save_pretrained(tmp)
            progress("reloading with PeftModel.from_pretrained on the original weights", 0.6)
            del trained, base
            reference, exported = residual_adapter_logits(cfg, run_dir, tmp, tokenizer, device, compute_dtype,
                                                          chosen.folder)
            kind_checked = "merged"  # two 16-bit models that differ by rounding
        elif kind == "adapter":
            progress("writing the adapter", 0.4)
            trained.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if (run_dir / adapter_init.INIT_FILE).is_file():  # LoftQ: what its base was (README, adapter inits)
                shutil.copy2(run_dir / adapter_init.INIT_FILE, tmp / adapter_init.INIT_FILE)
            progress("reloading with PeftModel.from_pretrained", 0.6)
            del trained
            base, _, _ = _load_base(cfg, device, run_dir)
            exported = fixed_prompt_logits(PeftModel.from_pretrained(base, tmp), tokenizer, device)
        else:
            del trained, base  # the 4-bit model goes before the 16-bit one is built
            progress("dequantizing the base and merging LoRA", 0.3)
            save_dtype = torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
            merged = merged_model(cfg, run_dir, device, save_dtype, chosen.folder)
            progress("writing safetensors", 0.6)
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del merged
            progress("reloading with AutoModelForCausalLM.from_pretrained", 0.8)
            exported = fixed_prompt_logits(loading.load_plain_model(tmp, dtype=save_dtype, device=device),
                                           tokenizer, device)
        verification = compare_logits(kind_checked, out, reference, exported)
        verification.export = kind
        if verification.ok:
            replace_folder(tmp, out, out.with_name(f".old-{out.name}-{os.getpid()}"))
    if not verification.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EngineError("export_mismatch", f"the {kind} export's logits differ from the trained model "
                          f"(max {verification.max_abs_logit_diff}, relative {verification.relative_l2})",
                          "Nothing was written. Report this with the run folder.")
    write_text_atomic(chosen.exports_dir(run_dir) / f"{kind}-verification.json",
                      json.dumps(verification.to_dict(), indent=1))
    progress("verified", 1.0)
    return verification


def residual_adapter_logits(cfg: RunConfig, run_dir: Path, converted: Path, tokenizer: Any, device: str,
                            compute_dtype: torch.dtype, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What a converted PiSSA / OLoRA adapter must equal: the 16-bit residual (W - s B0 A0, unquantized) with the
    trained adapter; and what it gives over the original 16-bit weights. The 4-bit rounding of the residual, which
    separates both from the trained model, is the same for any export of such a run."""
    from peft import PeftModel

    folder = loading.resolve_model(cfg.model, cfg.allow_pickle).path
    residual = loading.load_plain_model(folder, dtype=compute_dtype, device=device)
    adapter_init.apply_corrections(residual, run_dir / adapter_init.INIT_FILE, folder)
    reference = fixed_prompt_logits(PeftModel.from_pretrained(residual, adapter_dir), tokenizer, device)
    del residual
    original = loading.load_plain_model(folder, dtype=compute_dtype, device=device)
    return reference, fixed_prompt_logits(PeftModel.from_pretrained(original, converted), tokenizer, device)


def merged_model(cfg: RunConfig, run_dir: Path, device: str, save_dtype: torch.dtype, adapter_dir: Path) -> Any:
    """Base weights dequantized from exactly the 4-bit (or int8) values training saw, the LoRA in `adapter_dir`
    merged in (DoRA's magnitude too, by peft), plain Linear layers."""
    from peft import PeftModel

    base, _, compute_dtype = _load_base(cfg, device, run_dir)
    dequantize_linear4bit(base, compute_dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.to(save_dtype)


def dequantize_linear4bit(model: Any, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes Linear4bit (and Linear8bitLt) with an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight = weight_formats.dequantize_layer(module).to(dtype)
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=weight.device, dtype=dtype)
        plain.weight.data.copy_(weight)
        if module.bias is not None:
            plain.bias.data.copy_(module.bias.data.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.hf_quantizer = None
    # transformers refuses .to(dtype) and save_pretrained on models still marked as bitsandbytes-quantized
    for marker in ("quantization_method", "is_loaded_in_4bit"):
        if marker in vars(model):
            delattr(model, marker)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def recover_interrupted_export(out: Path) -> None:
    """Tidy up after an export that was killed: its temp folder goes, and a previous export it had moved aside
    to make room comes back if the new one never got into place. Folders of a running export are left alone."""
    if not out.parent.is_dir():
        return
    for prefix in (".old-", ".tmp-"):  # old ones first: a restored export is then not deleted as a leftover
        for leftover in sorted(out.parent.glob(f"{prefix}{glob.escape(out.name)}-*")):
            owner = leftover.name.rpartition("-")[2]
            if owner.isdigit() and process_alive(int(owner)):
                continue
            if prefix == ".old-" and not out.exists():
                os.replace(leftover, out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
