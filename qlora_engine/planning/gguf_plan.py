"""Before a GGUF export starts: whether llama.cpp's converter knows the architecture, the quantizations offered, each
file's estimated size, and the RAM and disk the export needs (the merge, the 16-bit GGUF it is quantized from, the
files). No torch: the Model and Export pages show it at once."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.planning.model_shape import ModelShape, model_shape
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_folders import FINAL_ADAPTER, adapter_folder, exports_folder

# Bits per weight of a whole file, as llama.cpp's quantize reports them for Llama-shaped models (tensors too small
# for a k-quant's 256-wide blocks fall back to other types, so tiny models differ). Order: largest first.
BITS_PER_WEIGHT = {"f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.70, "q4_k_m": 4.89}
QUANTS = tuple(BITS_PER_WEIGHT)
DEFAULT_QUANT = "q4_k_m"
# Quantizations whose greedy answers must match the merged model's (first 16 tokens on >= 90% of prompts); the
# others report their agreement and perplexity difference.
LOSSLESS_ENOUGH = ("f16", "bf16", "q8_0")
METADATA_BYTES = 8 * 2**20  # vocabulary, merges, chat template
RAM_SLACK_BYTES = 2 * 2**30  # the Python process, torch, the tokenizer, llama.cpp's context
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the binding and the sdist the converter comes from (products/llama_cpp_tools)
TOOLS_ENV = "QLORA_STUDIO_TOOLS"


def tools_dir() -> Path:
    """Where the pinned converter lives: $QLORA_STUDIO_TOOLS, else the user cache dir."""
    if os.environ.get(TOOLS_ENV):
        return Path(os.environ[TOOLS_ENV]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("qlora-studio")) / "tools"


def converter_dir() -> Path:
    return tools_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def supported_architectures(folder: Path | None = None) -> set[str]:
    """The Hugging Face architectures (config.json `architectures`) llama.cpp's converter has a class for, read from
    its `@ModelBase.register(...)` lines; empty when the converter is not extracted yet."""
    found: set[str] = set()
    for path in sorted(((folder or converter_dir()) / "conversion").glob("*.py")):
        for call in re.findall(r"@ModelBase\.register\(([^)]*)\)", path.read_text(encoding="utf-8")):
            found |= set(re.findall(r"\"([A-Za-z0-9_]+)\"", call))
    return found


def shipped_architectures() -> set[str]:
    """The same list, read from the pinned converter when it was pinned (resources/gguf_architectures.json; a test
    holds it to the extracted converter): known before the first GGUF export fetches the converter."""
    from qlora_engine.resources import resources_dir

    shipped = json.loads((resources_dir() / "gguf_architectures.json").read_text(encoding="utf-8"))
    return set(shipped["architectures"]) if shipped["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION else set()


def gguf_export_supported(config: dict[str, Any]) -> bool | None:
    """Whether GGUF export can convert a model of this config.json: by the converter on this machine, else by the
    list shipped for the pinned one; None only if neither is there."""
    known = supported_architectures() or shipped_architectures()
    if not known:
        return None
    return bool(set(config.get("architectures") or []) & known)


@dataclass(frozen=True)
class GgufPlan:
    """What an export of these quantizations writes and needs, in bytes."""

    params: int
    file_bytes: dict[str, int]  # quant -> estimated file size
    disk_bytes: int  # the merged folder (when not there yet), the 16-bit GGUF, every file
    ram_bytes: int  # the peak: the merge (compute dtype + 16-bit copy), or the reference next to a loaded GGUF


def parse_quants(text: str) -> list[str]:
    """`q8_0,q4_k_m` -> ["q8_0", "q4_k_m"]; an unknown name is a config error naming the allowed ones."""
    from qlora_engine.protocol.errors import config_error

    quants = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [q for q in quants if q not in BITS_PER_WEIGHT]
    if unknown or not quants:
        raise config_error(f"--quant {text!r}: unknown quantization {', '.join(unknown) or '(none given)'}",
                           f"Use one or more of {', '.join(QUANTS)}, comma-separated (e.g. q8_0,q4_k_m).")
    return list(dict.fromkeys(quants))


def shape_params(shape: ModelShape) -> int:
    linears = sum(linear.in_features * linear.out_features * linear.copies for linear in shape.decoder_linears())
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    return linears * shape.num_layers + embeddings


def gguf_file_bytes(params: int, quant: str) -> int:
    return int(params * BITS_PER_WEIGHT[quant] / 8) + METADATA_BYTES


def plan_gguf(params: int, quants: list[str], *, merged_exists: bool = False,
              compute_bytes_per_param: int = 4) -> GgufPlan:
    """The files' sizes and the export's needs for a model of `params` weights. `compute_bytes_per_param`: the
    dtype the base is dequantized to before the merge (4 for fp32 on a CPU, 2 for bf16 / fp16)."""
    sixteen_bit = 2 * params
    files = {quant: gguf_file_bytes(params, quant) for quant in quants}
    disk = (0 if merged_exists else sixteen_bit) + gguf_file_bytes(params, "bf16") + sum(files.values())
    merge_peak = params * (compute_bytes_per_param + 2)
    verify_peak = 4 * params + max(files.values(), default=0)  # the fp32 reference next to a loaded file
    return GgufPlan(params=params, file_bytes=files, disk_bytes=disk,
                    ram_bytes=max(merge_peak, verify_peak) + RAM_SLACK_BYTES)


def plan_for_config(config: dict[str, Any], quants: list[str], **kwargs: Any) -> GgufPlan:
    """The plan for a model's config.json (as a dict)."""
    shape, _ = model_shape(config)
    return plan_gguf(shape_params(shape), quants, **kwargs)


# ----------------------------------------------------------------------------- what this machine has
def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the drive `folder` is (or will be) on."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def merged_is_current(run_dir: Path, checkpoint: str = FINAL_ADAPTER) -> bool:
    """The merged export of the run's final adapter (or checkpoint step-N's) is there, passed its check, and is newer
    than that adapter: a GGUF export converts it as it is instead of merging again."""
    exports = exports_folder(run_dir, checkpoint)
    merged, record = exports / "merged", exports / "merged-verification.json"
    if not (merged / "config.json").is_file() or not record.is_file():
        return False
    adapter = adapter_folder(run_dir, checkpoint) / "adapter_model.safetensors"
    newer = not adapter.exists() or merged.stat().st_mtime >= adapter.stat().st_mtime
    return newer and bool(json.loads(record.read_text(encoding="utf-8")).get("ok"))


def resource_problems(plan: GgufPlan, out: Path, free_disk: int, available_ram: int | None) -> list[EngineError]:
    """What stops the export before the merge: too little disk on the drive of `out`, too little RAM; each an error
    naming how much is needed and there (the engine raises the first, the Export page shows them before Export)."""
    problems = []
    if free_disk < plan.disk_bytes:
        problems.append(EngineError(
            "not_enough_disk", f"the GGUF export needs about {size_text(plan.disk_bytes)} on the drive of {out}; "
            f"{size_text(free_disk)} is free", "Free disk space, pick another --out, or fewer quantizations "
            "(the 16-bit ones are the largest)."))
    if available_ram is not None and available_ram < plan.ram_bytes:
        problems.append(EngineError(
            "not_enough_ram", f"the merge before the GGUF export needs about {size_text(plan.ram_bytes)} of RAM; "
            f"{size_text(available_ram)} is available", "Close other programs, or export on a machine with more "
            "memory (the adapter export needs almost none)."))
    return problems


def size_text(n_bytes: float) -> str:
    """GiB from 1 GiB up, MiB below (a tiny model's export is not "0.0 GiB")."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ExportNeeds:
    """A GGUF export's plan against this machine, before it starts: the plan, the free disk on the drive of `out`
    and the available RAM, what would stop it, and whether llama.cpp's converter knows the architecture."""

    plan: GgufPlan
    out: str
    free_disk_bytes: int
    available_ram_bytes: int | None
    problems: tuple[EngineError, ...]
    architectures: tuple[str, ...]
    supported: bool | None  # None until the converter is on this machine (the first GGUF export fetches it)


def export_needs(config: dict[str, Any], quants: list[str], out: Path, merged_exists: bool) -> ExportNeeds:
    """The plan for a model's config.json and these quantizations, checked against this machine now."""
    plan = plan_for_config(config, quants, merged_exists=merged_exists)
    free_disk, available_ram = free_disk_bytes(out), available_ram_bytes()
    return ExportNeeds(plan=plan, out=str(out), free_disk_bytes=free_disk, available_ram_bytes=available_ram,
                       problems=tuple(resource_problems(plan, out, free_disk, available_ram)),
                       architectures=tuple(config.get("architectures") or ()),
                       supported=gguf_export_supported(config))
