"""Memory readings: torch's CUDA counters, NVML's device view (sampled by a thread: it sees bitsandbytes' paged
optimizer states in managed memory, which torch's counters miss), and the host RSS peak (CPU runs)."""

from __future__ import annotations

import resource
import threading
from typing import Optional


# torch reads its allocator settings once, when CUDA first initialises (any torch.cuda call that needs the
# device: mem_get_info, init, an allocation); set after that, they are ignored for the life of the process.
# Unsloth sets the same at import, but the trainer asks the card for its free memory before that import: without
# this, expandable segments were off and lean 8B 8 x 2048 reserved 19.7 GiB instead of 18.6 (H200, 2026-12-01).
CUDA_ALLOCATOR_SETTINGS = "expandable_segments:True"


def set_cuda_allocator_settings() -> None:
    """Before the first CUDA call: expandable segments (less fragmentation), unless the user set their own."""
    import os

    os.environ.setdefault("PYTORCH_ALLOC_CONF", CUDA_ALLOCATOR_SETTINGS)


def host_rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            import os
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def torch_gpu_memory() -> Optional[dict[str, int]]:
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return {"gpu_allocated": torch.cuda.memory_allocated(), "gpu_reserved": torch.cuda.memory_reserved(),
            "gpu_peak": torch.cuda.max_memory_reserved(),
            "gpu_peak_allocated": torch.cuda.max_memory_allocated()}


class DeviceMonitor:
    """Samples NVML every `interval` s for device 0 (the pod sees its one GPU): used memory, its peak, and
    utilisation. `available` is False without a GPU or pynvml; then every reading is None."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.used: Optional[int] = None
        self.peak: Optional[int] = None
        self.utilization: Optional[float] = None
        self.available = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.available = True
        except Exception:  # no library, no driver, no device: the CPU case
            self._nvml = None

    def sample(self) -> None:
        if not self.available:
            return
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        self.used = int(info.used)
        self.peak = max(self.peak or 0, self.used)
        self.utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:
                return

    def start(self) -> "DeviceMonitor":
        if self.available and self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def snapshot(monitor: Optional[DeviceMonitor] = None) -> dict[str, int]:
    """The memory figures of this moment, for step events and the summary (keys absent when unknown)."""
    figures: dict[str, int] = {"host_rss": host_rss_bytes(), "host_rss_peak": host_rss_peak_bytes()}
    gpu = torch_gpu_memory()
    if gpu:
        figures.update(gpu)
    if monitor is not None and monitor.used is not None:
        figures["device_used"] = monitor.used
        figures["device_peak"] = monitor.peak or monitor.used
    return figures
