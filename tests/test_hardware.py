"""GPU detection through NVML, faked: a GPU present, no driver, pynvml missing. No GPU or torch needed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlora_engine.planning import hardware

GIB = 2**30


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 3090"
    total_bytes: int = 24 * GIB
    used_bytes: int = 1 * GIB
    capability: tuple[int, int] = (8, 6)
    uuid: str = "GPU-3090-aaaa"
    utilization_percent: int | None = 12
    temperature_c: int = 45
    mig_slices: list[FakeGpu] | None = None  # None: a GPU without MIG


def fake_pynvml(gpus: list[FakeGpu], init_error: str | None = None) -> types.ModuleType:
    """A stand-in for the pynvml module with the calls hardware.py makes; counts init/shutdown."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.open_sessions = 0

    def init() -> None:
        if init_error:
            raise FakeNVMLError(init_error)
        nvml.open_sessions += 1

    def shutdown() -> None:
        nvml.open_sessions -= 1

    def memory(gpu: FakeGpu) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=gpu.total_bytes, used=gpu.used_bytes,
                                     free=gpu.total_bytes - gpu.used_bytes)

    def utilization(gpu: FakeGpu) -> types.SimpleNamespace:
        if gpu.utilization_percent is None:
            raise FakeNVMLError("Not Supported")
        return types.SimpleNamespace(gpu=gpu.utilization_percent, memory=0)

    def mig_mode(gpu: FakeGpu) -> tuple[int, int]:
        if gpu.mig_slices is None:
            raise FakeNVMLError("Not Supported")
        return (1, 1)

    def mig_slice(gpu: FakeGpu, slot: int) -> FakeGpu:
        if gpu.mig_slices[slot] is None:
            raise FakeNVMLError("Not Found")
        return gpu.mig_slices[slot]

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    nvml.nvmlSystemGetCudaDriverVersion = lambda: 12040
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda index: gpus[index]
    nvml.nvmlDeviceGetName = lambda gpu: gpu.name.encode()  # older pynvml returns bytes
    nvml.nvmlDeviceGetUUID = lambda gpu: gpu.uuid
    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetCudaComputeCapability = lambda gpu: gpu.capability
    nvml.nvmlDeviceGetUtilizationRates = utilization
    nvml.nvmlDeviceGetTemperature = lambda gpu, sensor: gpu.temperature_c
    nvml.nvmlDeviceGetMigMode = mig_mode
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda gpu: len(gpu.mig_slices)
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_slice
    return nvml


@pytest.fixture
def one_rtx_3090(monkeypatch) -> types.ModuleType:
    nvml = fake_pynvml([FakeGpu()])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


def test_a_gpu_is_reported_with_memory_driver_capability_and_bf16(one_rtx_3090):
    report = hardware.detect_gpus()
    assert report.problem == ""
    assert report.driver_version == "550.54.15" and report.cuda_driver_version == "12.4"
    (gpu,) = report.gpus
    assert gpu.name == "NVIDIA GeForce RTX 3090"
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (24 * GIB, 1 * GIB, 23 * GIB)
    assert gpu.compute_capability == (8, 6) and gpu.bf16_supported
    assert (gpu.utilization_percent, gpu.temperature_c) == (12, 45)


def test_a_pre_ampere_gpu_has_no_bf16(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([FakeGpu(name="Tesla T4", capability=(7, 5))]))
    assert not hardware.detect_gpus().gpus[0].bf16_supported


def test_a_reading_the_gpu_does_not_support_is_left_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([FakeGpu(utilization_percent=None)]))
    assert hardware.detect_gpus().gpus[0].utilization_percent is None


def test_nvml_is_shut_down_after_detection(one_rtx_3090):
    hardware.detect_gpus()
    assert one_rtx_3090.open_sessions == 0


def test_no_driver_is_a_plain_no_gpu_state_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error="Driver Not Loaded"))
    report = hardware.detect_gpus()
    assert not report.has_gpu
    assert report.problem.startswith("no NVIDIA GPU found: training runs on the CPU")
    assert "Driver Not Loaded" in report.problem


def test_a_driver_without_gpus_says_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    report = hardware.detect_gpus()
    assert not report.has_gpu and report.problem == hardware.NO_GPU_MESSAGE


def test_missing_pynvml_says_which_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = hardware.detect_gpus()
    assert not report.has_gpu and "pip install nvidia-ml-py" in report.problem


def test_training_gpu_is_the_first_one_cuda_visible_devices_names(monkeypatch):
    gpus = [FakeGpu(name="first", uuid="GPU-1111"), FakeGpu(name="second", uuid="GPU-2222")]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus))
    report = hardware.detect_gpus()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hardware.training_gpu(report).name == "first"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert hardware.training_gpu(report).name == "second"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222")
    assert hardware.training_gpu(report).name == "second"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.training_gpu(report) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # a run of two processes: cuda:0 and cuda:1, in that order
    assert [g.name for g in hardware.training_gpus(report, 2)] == ["second", "first"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [g.name for g in hardware.training_gpus(report, 3)] == ["first", "second"]  # only two there


def test_a_gpu_in_mig_mode_lists_its_slices_and_training_uses_the_visible_one(monkeypatch):
    slices = [FakeGpu(name="MIG 3g.40gb", total_bytes=40 * GIB, uuid="MIG-aaaa"), None,
              FakeGpu(name="MIG 1g.10gb", total_bytes=10 * GIB, uuid="MIG-bbbb")]
    h100 = FakeGpu(name="NVIDIA H100 80GB HBM3", total_bytes=80 * GIB, capability=(9, 0), uuid="GPU-h100",
                   mig_slices=slices)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([h100]))
    report = hardware.detect_gpus()
    assert [mig.name for mig in report.gpus[0].mig_devices] == ["MIG 3g.40gb", "MIG 1g.10gb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    assert hardware.training_gpu(report).free_bytes == 9 * GIB
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert hardware.training_gpu(report).name == "MIG 3g.40gb"
    assert "MIG 1g.10gb: 10.0 GiB total" in hardware.describe_report(report)


def test_gpu_command_prints_the_card(one_rtx_3090, capsys):
    assert hardware.gpu_main([]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: NVIDIA GeForce RTX 3090" in text and "23.0 GiB free" in text and "bf16 yes" in text


def test_gpu_command_json_parses(one_rtx_3090, capsys):
    assert hardware.gpu_main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"][0]["free_bytes"] == 23 * GIB and report["problem"] == ""


def test_gpu_command_without_a_gpu_explains_and_exits_0(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error="Driver Not Loaded"))
    assert hardware.gpu_main([]) == 0
    assert "no NVIDIA GPU found" in capsys.readouterr().out


def test_sampler_reports_the_latest_whole_gpu_used_memory(one_rtx_3090):
    gpu = one_rtx_3090.nvmlDeviceGetHandleByIndex(0)
    with hardware.GpuSampler(index=0, interval_s=0.01) as sampler:
        assert sampler.total_bytes == 24 * GIB
        _wait_for(lambda: sampler.latest_used_bytes == 1 * GIB)
        gpu.used_bytes = 5 * GIB
        _wait_for(lambda: sampler.latest_used_bytes == 5 * GIB)
    assert one_rtx_3090.open_sessions == 0


def test_sampler_without_nvml_has_no_readings_and_stops_cleanly(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with hardware.GpuSampler() as sampler:
        assert sampler.latest_used_bytes is None
    assert "nvidia-ml-py" in sampler.problem


def test_light_modules_import_without_torch():
    planning = Path(__file__).parents[1] / "qlora_engine" / "planning"
    modules = ", ".join(f"qlora_engine.planning.{path.stem}" for path in sorted(planning.glob("*.py")))
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def _wait_for(condition, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the sampler never reported the expected value"
        time.sleep(0.005)
