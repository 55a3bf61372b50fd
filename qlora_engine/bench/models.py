"""What every bench builds on: random-init models of a real architecture's exact shape (16-bit or 4-bit, straight on
the device, no download) and a sampler of the whole GPU's used memory (NVML)."""
from __future__ import annotations

import gc
import threading
from typing import Any

from qlora_engine.protocol.config import RunConfig
from qlora_engine.resources import resources_dir

MODEL_CONFIGS = resources_dir() / "model_configs"


class NvmlPeak:
    """Samples whole-GPU used memory every 20 ms in a thread; keeps the maximum since the last reset. With
    `process_id`, also that process's own used memory (NVML's per-process accounting: what several bench processes
    sharing one GPU each use; `process_peak_bytes` stays 0 where NVML does not list the process, e.g. in a container
    whose process ids differ from the host's). `index`: the GPU (a rank of several processes samples its own)."""

    def __init__(self, process_id: int | None = None, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._process_id = process_id
        self.peak_bytes = 0
        self.process_peak_bytes = 0
        self._lock = threading.Lock()
        self._generation = 0  # counts resets: a sample begun before one is dropped, not folded into the new peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used_bytes(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used_bytes(self) -> int:
        if self._process_id is None:
            return 0
        try:
            listed = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return 0
        return next((int(p.usedGpuMemory or 0) for p in listed if p.pid == self._process_id), 0)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        """One reading into the peaks. NVML's process list is slow to ask with many processes on the GPU: a reading
        that began before a reset (while a model was still being built) is stale, and dropped."""
        with self._lock:
            generation = self._generation
        used, process_used = self.used_bytes(), self.process_used_bytes()
        with self._lock:
            if generation == self._generation:
                self.peak_bytes = max(self.peak_bytes, used)
                self.process_peak_bytes = max(self.process_peak_bytes, process_used)

    def reset(self) -> None:
        used, process_used = self.used_bytes(), self.process_used_bytes()
        with self._lock:
            self._generation += 1
            self.peak_bytes, self.process_peak_bytes = used, process_used

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def random_model(model_config: dict[str, Any], cfg: RunConfig, device: str = "cuda") -> Any:
    """A random-init model of this shape, built straight on the device in the compute dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_engine.model.loading import resolve_compute_dtype

    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    values = {k: v for k, v in model_config.items() if k not in ("architectures", "transformers_version")}
    config = AutoConfig.for_model(**values)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_quantized_model(model_config: dict[str, Any], cfg: RunConfig, device: str = "cuda",
                           shardable: bool = False) -> Any:
    """A random-init model of this shape on the device, every decoder Linear turned into a bitsandbytes Linear4bit
    (`shardable`: its codes stored as the compute dtype, as a run's loader does for parallel: fsdp)."""
    import bitsandbytes as bnb
    import torch

    model = random_model(model_config, cfg, device)
    dtype = model.dtype
    storage = dtype if shardable else torch.uint8
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=cfg.double_quant,
                                      quant_type=cfg.quant_type, device="meta",
                                      quant_storage=storage)
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                             compress_statistics=cfg.double_quant, quant_type=cfg.quant_type,
                                             quant_storage=storage).to(device)
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
        del module
    model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it: peft picks its bnb layers
    return _freed(model, device)


def random_planned_model(model_config: dict[str, Any], cfg: RunConfig, device: str = "cuda") -> Any:
    """A random-init model of this shape under cfg's precision budget: each decoder matrix in the format the
    budget's solver picks for it from these weights, as a run's base (model/run_base.py) is built."""
    from qlora_engine.model import precision_budget
    from qlora_engine.model.loading import resolve_compute_dtype

    model, _ = precision_budget.planned_model(lambda: random_model(model_config, cfg, device), cfg,
                                              resolve_compute_dtype(cfg.compute_dtype, device), device, None)
    return _freed(model, device)


def _freed(model: Any, device: str) -> Any:
    import torch

    gc.collect()  # the replaced 16-bit modules reference each other: free them before anything is measured
    if device == "cuda":
        torch.cuda.empty_cache()
    return model
