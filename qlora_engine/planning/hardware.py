"""What NVIDIA GPUs this machine has, read through NVML (pynvml): memory, driver, compute capability, load.

Also a once-a-second sampler of whole-GPU used memory, and `qlora-studio gpu`. No torch import here: no GPU,
no driver or no pynvml is a normal state with a plain message, never an exception.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

NO_GPU_MESSAGE = "no NVIDIA GPU found: training runs on the CPU, slowly; small models only"
NO_PYNVML_MESSAGE = ("GPU detection is unavailable because the nvidia-ml-py package is not installed "
                     "(pip install nvidia-ml-py); without it the app assumes training runs on the CPU")
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere and newer do bf16 matmuls in hardware
BYTES_PER_GIB = 2**30


@dataclass
class GpuInfo:
    """One GPU as NVML numbers it (PCI bus order; see `training_gpu` for the one CUDA calls cuda:0)."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: tuple[int, int]
    bf16_supported: bool
    utilization_percent: int | None = None  # None where the GPU or driver does not report it
    temperature_c: int | None = None
    mig_devices: list[GpuInfo] = field(default_factory=list)  # MIG slices: what CUDA sees when MIG is on


@dataclass
class GpuReport:
    """Every GPU NVML sees, the driver, and `problem`: empty when detection worked, else why it did not."""

    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # the newest CUDA the driver supports, e.g. "12.4"
    problem: str = ""

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    """pynvml returns bytes in older releases and str in newer ones."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _optional_reading(nvml: ModuleType, read: Any, *args: Any) -> Any:
    """A reading some GPUs don't support (utilization, temperature): None instead of an error."""
    try:
        return read(*args)
    except nvml.NVMLError:
        return None


def _read_device(nvml: ModuleType, handle: Any, index: int, capability: tuple[int, int] | None = None) -> GpuInfo:
    """One GPU, or one MIG slice of it (which shares its GPU's index and compute capability)."""
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    capability = capability or tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
    utilization = _optional_reading(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    temperature = _optional_reading(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    uuid = _optional_reading(nvml, nvml.nvmlDeviceGetUUID, handle)
    return GpuInfo(index=index, name=_text(nvml.nvmlDeviceGetName(handle)), uuid=_text(uuid or ""),
                   total_bytes=int(memory.total), free_bytes=int(memory.free), used_bytes=int(memory.used),
                   compute_capability=(int(capability[0]), int(capability[1])),
                   bf16_supported=capability >= BF16_MIN_COMPUTE_CAPABILITY,
                   utilization_percent=None if utilization is None else int(utilization.gpu),
                   temperature_c=None if temperature is None else int(temperature))


def _read_gpu(nvml: ModuleType, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    gpu = _read_device(nvml, handle, index)
    gpu.mig_devices = _read_mig_devices(nvml, handle, gpu)
    return gpu


def _read_mig_devices(nvml: ModuleType, handle: Any, gpu: GpuInfo) -> list[GpuInfo]:
    """The MIG slices of a GPU in MIG mode; empty for a GPU without MIG (most raise NotSupported)."""
    mode = _optional_reading(nvml, nvml.nvmlDeviceGetMigMode, handle)
    if mode is None or mode[0] != nvml.NVML_DEVICE_MIG_ENABLE:
        return []
    slots = [_optional_reading(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
             for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))]
    return [_read_device(nvml, slot, gpu.index, gpu.compute_capability)
            for slot in slots if slot is not None]  # None: an empty slot


def _cuda_version_text(version: int) -> str:
    """NVML's 12040 is CUDA 12.4."""
    return f"{version // 1000}.{version % 1000 // 10}"


def detect_gpus() -> GpuReport:
    """Everything NVML reports about this machine's NVIDIA GPUs; never raises."""
    nvml = _import_pynvml()
    if nvml is None:
        return GpuReport(problem=NO_PYNVML_MESSAGE)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuReport(problem=f"{NO_GPU_MESSAGE} (NVML: {exc})")
    try:
        report = GpuReport(driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
                           cuda_driver_version=_cuda_version_text(nvml.nvmlSystemGetCudaDriverVersion()))
        report.gpus = [_read_gpu(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
        if not report.gpus:
            report.problem = NO_GPU_MESSAGE
        return report
    except nvml.NVMLError as exc:
        return GpuReport(problem=f"the NVIDIA driver answered with an error, so GPUs can't be used: {exc}")
    finally:
        nvml.nvmlShutdown()


def training_gpu(report: GpuReport | None = None) -> GpuInfo | None:
    """The GPU (or MIG slice) training would call cuda:0: the first CUDA_VISIBLE_DEVICES names, else NVML's first.

    CUDA_VISIBLE_DEVICES may hold indices or UUIDs (or a prefix of one); an empty value or -1 hides every GPU.
    """
    found = training_gpus(report, 1)
    return found[0] if found else None


def training_gpus(report: GpuReport | None = None, count: int = 1) -> list[GpuInfo]:
    """The GPUs a run of `count` processes trains on (one per process: cuda:0 … cuda:count-1), as training_gpu
    reads CUDA_VISIBLE_DEVICES; fewer when fewer are visible."""
    report = detect_gpus() if report is None else report
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = ([str(gpu.index) for gpu in report.gpus] or ["0"]) if visible is None else visible.split(",")
    found = [_visible_device(report, name.strip()) for name in names[:count]]
    return [gpu for gpu in found if gpu is not None]


def _visible_device(report: GpuReport, name: str) -> GpuInfo | None:
    if name.isdigit():
        gpu = next((gpu for gpu in report.gpus if gpu.index == int(name)), None)
        return gpu.mig_devices[0] if gpu and gpu.mig_devices else gpu
    if name.startswith(("GPU-", "MIG-")):
        devices = [device for gpu in report.gpus for device in (gpu, *gpu.mig_devices)]
        return next((device for device in devices if device.uuid.startswith(name)), None)
    return None


class GpuSampler:
    """Reads one GPU's whole-device used memory every `interval_s` on a background thread.

    Whole-device means every process, ours included, as nvidia-smi shows it. `latest_used_bytes` is None until
    the first reading, and stays None when NVML is unavailable (`problem` says why).
    """

    def __init__(self, index: int = 0, interval_s: float = 1.0) -> None:
        self.index = index
        self.interval_s = interval_s
        self.total_bytes: int | None = None
        self.problem = ""
        self._latest_used_bytes: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: ModuleType | None = None

    @property
    def latest_used_bytes(self) -> int | None:
        with self._lock:
            return self._latest_used_bytes

    def start(self) -> GpuSampler:
        if self._thread is not None:
            return self
        handle = self._open()
        if handle is None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(handle,), name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _open(self) -> Any:
        """NVML's handle for our GPU, or None with `problem` set."""
        nvml = _import_pynvml()
        if nvml is None:
            self.problem = NO_PYNVML_MESSAGE
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.problem = f"{NO_GPU_MESSAGE} (NVML: {exc})"
            return None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            self.total_bytes = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        except nvml.NVMLError as exc:
            nvml.nvmlShutdown()
            self.problem = f"GPU {self.index} can't be read: {exc}"
            return None
        self._nvml = nvml
        return handle

    def _run(self, handle: Any) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                used_bytes = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            except nvml.NVMLError as exc:
                self.problem = f"GPU {self.index} stopped answering: {exc}"
                return
            with self._lock:
                self._latest_used_bytes = used_bytes
            self._stop.wait(self.interval_s)


# ----------------------------------------------------------------------------- qlora-studio gpu
def describe_report(report: GpuReport) -> str:
    """The `qlora-studio gpu` text: one block per GPU, or the reason there is none."""
    if not report.gpus:
        return report.problem
    driver = f"{report.driver_version} (CUDA {report.cuda_driver_version})"
    blocks = []
    for gpu in report.gpus:
        busy = "?" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%"
        temperature = "?" if gpu.temperature_c is None else f"{gpu.temperature_c} °C"
        major, minor = gpu.compute_capability
        blocks.append("\n".join([
            f"GPU {gpu.index}: {gpu.name}",
            f"  memory   {gpu.total_bytes / BYTES_PER_GIB:.1f} GiB total, {gpu.free_bytes / BYTES_PER_GIB:.1f} GiB "
            f"free, {gpu.used_bytes / BYTES_PER_GIB:.1f} GiB used",
            f"  compute  capability {major}.{minor}, bf16 {'yes' if gpu.bf16_supported else 'no (fp16 is used)'}",
            f"  driver   {driver}",
            f"  now      {busy} busy, {temperature}",
            *[f"  MIG      {mig.name}: {mig.total_bytes / BYTES_PER_GIB:.1f} GiB total, "
              f"{mig.free_bytes / BYTES_PER_GIB:.1f} GiB free ({mig.uuid})" for mig in gpu.mig_devices],
        ]))
    return "\n\n".join(blocks)


def gpu_main(argv: list[str]) -> int:
    """`qlora-studio gpu [--json]`: argv is what follows `gpu`. No GPU is an answer, not a failure: exit 0."""
    parser = argparse.ArgumentParser(prog="qlora-studio gpu", description="Show the NVIDIA GPUs training can use.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    report = detect_gpus()
    print(json.dumps(report.to_dict(), indent=2) if args.json else describe_report(report))
    return 0
