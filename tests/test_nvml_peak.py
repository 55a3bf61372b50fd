"""NvmlPeak, the bench's sampler of NVML's used memory (qlora_engine/bench/models.py), against a pynvml whose
process-list call is slow, as the real one is with many bench processes on one GPU."""
from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

from qlora_engine.bench.models import NvmlPeak

GIB = 2**30


class BlockingNvml:
    """pynvml as NvmlPeak's sampling thread sees it: its process-list call blocks until released, as NVML's does
    for a while with many processes on one GPU, and answers with the memory in use when it was asked."""

    NVMLError = RuntimeError
    PID = 4242

    def __init__(self, used_bytes: int) -> None:
        self.used_bytes, self.calls = used_bytes, 0
        self.main = threading.get_ident()
        self.sampling, self.release = threading.Event(), threading.Event()

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=self.used_bytes)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:  # noqa: N802
        used = self.used_bytes
        if threading.get_ident() != self.main:
            self.calls += 1
            if not self.release.is_set():
                self.sampling.set()
                self.release.wait(10)
        return [SimpleNamespace(pid=self.PID, usedGpuMemory=used)]


def test_a_reading_begun_before_a_reset_does_not_become_the_new_peak(monkeypatch):
    """The 2026-12-04 grid's Llama-3.1-8B row read 19.2 GiB under a 12 GiB cap: its 16-bit build, sampled just
    before the measurement's reset and stored just after it."""
    fake = BlockingNvml(used_bytes=19 * GIB)  # the model being built in 16-bit
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    peak = NvmlPeak(process_id=BlockingNvml.PID)
    try:
        assert fake.sampling.wait(10)  # the sampler is inside NVML, holding the build's reading
        fake.used_bytes = 2 * GIB  # the build freed; the measured steps begin
        peak.reset()
        calls = fake.calls
        fake.release.set()
        deadline = time.monotonic() + 10
        while fake.calls < calls + 2 and time.monotonic() < deadline:  # two readings after the reset
            time.sleep(0.01)
        assert fake.calls >= calls + 2
        assert peak.process_peak_bytes == 2 * GIB and peak.peak_bytes == 2 * GIB
    finally:
        peak.close()
