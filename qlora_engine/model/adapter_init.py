"""Adapter starts other than peft's default on a quantized base (LoftQ, PiSSA, OLoRA), and the base they leave.

The math is peft's: `loftq_utils._low_rank_decomposition` (what `replace_lora_weights_loftq` and `loftq_init` run),
and peft's own LoRA layer computing the PiSSA / OLoRA start over a 16-bit copy of the weight. What differs:
- peft's LoftQ hard-codes compute_device = "cuda" and ignores the LoRA scaling (it is right only for alpha = r);
  here it runs on the weight's device, each factor divided by sqrt(scaling) so that scaling * B A is peft's B A.
- peft refuses PiSSA on a 4-bit layer ("initialize under float32 ... re-quantize the residual"); that is done here:
  PiSSA on the original 16-bit weight, the residual re-quantized in the layer's own format (block size kept).
PiSSA, OLoRA and LoftQ with more than one iteration change the frozen base: base = quant(source - left @ right). The
factors are written to the run folder (INIT_FILE) so that resume, chat and export rebuild exactly that base, and so
that the adapter can be exported as a plain LoRA over the original weights (peft's PiSSA-to-LoRA conversion).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qlora_engine.model import weight_formats as wf
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError

INIT_FILE = "adapter_init.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
# where the base's corrected weight comes from: the checkpoint's 16-bit weights, or the 4-bit base as loaded
SOURCE_ORIGINAL, SOURCE_LOADED = "original", "loaded"
RESIDUAL_STARTS = ("pissa", "olora")  # the adapter holds part of the weights: W = base + s B0 A0 at step 0


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """The LoRA layers by the name of the module they wrap in the bare model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}


def original_weight(model_folder: Path, name: str) -> torch.Tensor:
    """A linear layer's weight as the checkpoint stores it (one file or shards)."""
    from safetensors import safe_open

    index = model_folder / "model.safetensors.index.json"
    key = f"{name}.weight"
    if index.is_file():
        file = model_folder / json.loads(index.read_text(encoding="utf-8"))["weight_map"][key]
    else:
        file = model_folder / "model.safetensors"
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        return handle.get_tensor(key)


def initialize(peft_model: Any, cfg: RunConfig, init_file: Path | None) -> str:
    """Give every LoRA layer cfg.init_lora's start (or, when `init_file` exists, rebuild the base it recorded);
    returns a line for the log."""
    if cfg.init_lora == "default":
        return ""
    base_model = peft_model.get_base_model()
    folder = Path(base_model.name_or_path)
    if init_file is not None and init_file.is_file():
        count = apply_corrections(base_model, init_file, folder)
        remember_start(peft_model, init_file)
        return f"{cfg.init_lora}: the base of {count} layers rebuilt from {init_file.name}"
    start = {"loftq": _loftq, "pissa": _pissa, "olora": _olora}[cfg.init_lora]
    corrections: dict[str, torch.Tensor] = {}
    skipped = 0
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            correction = start(layer, lambda n=name: original_weight(folder, n), cfg)
            if correction is False:
                skipped += 1
                continue
            if correction is not None:
                corrections[f"{name}.left"], corrections[f"{name}.right"] = correction
            corrections[f"{name}.start_a"], corrections[f"{name}.start_b"] = adapter_weights(layer)
    peft_model.starting_adapter = _starts(corrections)
    source = SOURCE_LOADED if cfg.init_lora == "olora" else SOURCE_ORIGINAL
    if init_file is not None:
        save_corrections(corrections, source, cfg, init_file)
    note = f" ({skipped} 16-bit layers keep the default start: nothing to correct)" if skipped else ""
    return f"{cfg.init_lora}: adapter start computed for {len(lora_layers(peft_model)) - skipped} layers{note}"


def adapter_weights(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone()


def _starts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = {key.removesuffix(".start_a") for key in tensors if key.endswith(".start_a")}
    return {name: (tensors[f"{name}.start_a"], tensors[f"{name}.start_b"]) for name in names}


def remember_start(peft_model: Any, init_file: Path) -> None:
    """Keep the run's starting adapter on the model (`starting_adapter`) so that `as_started` can show the model as
    training began: the honest "base" of a LoftQ / PiSSA / OLoRA run, whose base alone is not the original model."""
    from safetensors.torch import load_file

    peft_model.starting_adapter = _starts(load_file(str(init_file)))


@contextmanager
def as_started(peft_model: Any) -> Iterator[None]:
    """The model as training began: the starting adapter swapped in (a LoftQ / PiSSA / OLoRA run), or the adapter
    off (a default start, whose B is zero: the same thing)."""
    starts = getattr(peft_model, "starting_adapter", None)
    if not starts:
        with peft_model.disable_adapter():
            yield
        return
    layers = lora_layers(peft_model)
    trained = {name: adapter_weights(layers[name]) for name in starts}
    try:
        for name, (lora_a, lora_b) in starts.items():
            _set_adapter(layers[name], lora_a, lora_b)
        yield
    finally:
        for name, (lora_a, lora_b) in trained.items():
            _set_adapter(layers[name], lora_a, lora_b)


def _set_adapter(layer: Any, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    for weight, value in ((layer.lora_A[ADAPTER].weight, lora_a), (layer.lora_B[ADAPTER].weight, lora_b)):
        weight.data = value.to(weight.device, weight.dtype).contiguous()


def _loftq(layer: Any, original: Any, cfg: RunConfig) -> Any:
    """peft's LoftQ alternation: quantize the residual, SVD of the error; factors balanced by sqrt(scaling)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    base = layer.get_base_layer()
    if wf.layer_format(base).kind == "16bit":
        return False
    weight = original().to(base.weight.device, torch.float32)
    rank, scaling = layer.r[ADAPTER], layer.scaling[ADAPTER]
    dequantized = wf.dequantize_layer(base)  # iteration 1 starts from the base as loaded (replace_lora_weights_loftq)
    previous = residual_source = None
    for iteration in range(cfg.loftq_iters):
        if iteration:
            residual_source = weight - previous[0] @ previous[1]
            dequantized = wf.dequantize(wf.like(base, residual_source))
        factors = _low_rank_decomposition(weight - dequantized, reduced_rank=rank)
        if iteration + 1 < cfg.loftq_iters:
            previous = (factors["L"], factors["R"])
    root = math.sqrt(scaling)
    _set_adapter(layer, factors["R"] / root, factors["L"] / root)
    if previous is None:
        return None
    wf.refill(base, residual_source)
    return previous


def _pissa(layer: Any, original: Any, cfg: RunConfig) -> Any:
    weight = original().to(layer.get_base_layer().weight.device, torch.float32)
    return _residual_start(layer, weight, "pissa", cfg.use_rslora)


def _olora(layer: Any, original: Any, cfg: RunConfig) -> Any:
    return _residual_start(layer, wf.dequantize_layer(layer.get_base_layer()), "olora", cfg.use_rslora)


def _residual_start(layer: Any, weight: torch.Tensor, how: str, use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's own LoRA layer computes the start over a 16-bit copy; its residual goes back into the base in the base's
    format. Returns (left, right) with base = quant(weight - left @ right)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = layer.get_base_layer()
    plain = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    plain.weight.data = weight.float()
    config = LoraConfig(r=layer.r[ADAPTER], lora_alpha=layer.lora_alpha[ADAPTER], lora_dropout=0.0,
                        init_lora_weights=how, use_rslora=use_rslora)
    probe = LoraLinear(plain, ADAPTER, config, r=config.r, lora_alpha=config.lora_alpha)
    if probe.scaling[ADAPTER] != layer.scaling[ADAPTER]:
        raise EngineError("internal", f"{how}: scaling {probe.scaling[ADAPTER]} != {layer.scaling[ADAPTER]}",
                          "Report this with the run's config.")
    lora_a, lora_b = probe.lora_A[ADAPTER].weight.data, probe.lora_B[ADAPTER].weight.data
    _set_adapter(layer, lora_a, lora_b)
    wf.refill(base, probe.base_layer.weight.data)
    return layer.scaling[ADAPTER] * lora_b, lora_a


def save_corrections(corrections: dict[str, torch.Tensor], source: str, cfg: RunConfig, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in corrections.items()}, str(tmp),
              metadata={"source": source, "init_lora": cfg.init_lora, "loftq_iters": str(cfg.loftq_iters)})
    os.replace(tmp, path)


def init_method(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.metadata()["init_lora"]


def read_corrections(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        source = handle.metadata()["source"]
        names = sorted(key.removesuffix(".left") for key in handle.keys() if key.endswith(".left"))
        return {n: (handle.get_tensor(f"{n}.left"), handle.get_tensor(f"{n}.right")) for n in names}, source


def apply_corrections(base_model: Any, path: Path, model_folder: Path) -> int:
    """Rebuild the base training saw: each recorded layer's weight = quant(source - left @ right). Works on a bare
    model or on one peft has wrapped."""
    corrections, source = read_corrections(path)
    with torch.no_grad():
        for name, (left, right) in corrections.items():
            module = base_model.get_submodule(name)
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weight = (original_weight(model_folder, name).float() if source == SOURCE_ORIGINAL
                      else wf.dequantize_layer(base)).to(left.device)
            wf.refill(base, weight - left @ right)
    return len(corrections)


def adapter_over_original(adapter_dir: Path, init_file: Path, out_dir: Path) -> None:
    """The trained adapter as a plain LoRA of rank 2r over the original weights (peft's PiSSA/OLoRA conversion,
    `path_initial_model_for_weight_conversion`): W + s'(B'A') = (W - left @ right) + s B A."""
    from safetensors.torch import load_file, save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    rank, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    scaling = alpha / (math.sqrt(rank) if rslora else rank)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    corrections, _ = read_corrections(init_file)
    converted = {}
    for key, value in tensors.items():
        if ".lora_B." in key:
            continue
        if ".lora_A." not in key:
            converted[key] = value
            continue
        name = key.removeprefix(PEFT_PREFIX).partition(".lora_A.")[0]
        key_b = key.replace(".lora_A.", ".lora_B.")
        left, right = corrections.get(name, (torch.zeros(tensors[key_b].shape[0], rank),
                                             torch.zeros(rank, value.shape[1])))
        converted[key] = torch.cat([value, right.to(value.dtype)], dim=0).contiguous()
        converted[key_b] = torch.cat([tensors[key_b], (-left / scaling).to(value.dtype)], dim=1).contiguous()
    config.update(r=2 * rank, lora_alpha=alpha * (math.sqrt(2) if rslora else 2), init_lora_weights=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
