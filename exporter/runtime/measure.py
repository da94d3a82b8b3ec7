"""What benchmarks measure with, torch-free (the runtime's bench and `tinyprune bench` share it): process memory
from Linux /proc (no psutil: peak RSS, VmHWM, per block of work), latency statistics, interleaved timing, the
machine's description and the feeds components are timed with."""

from __future__ import annotations

import gc
import os
import platform
import time

import numpy as np


def release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc keeps freed heap pages otherwise), so that the
    next figure starts from what is really alive."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


MADV_PAGEOUT = 21  # Linux >= 5.4


def page_out_weights(which=lambda path: True) -> int:
    """Ask the kernel to reclaim the resident pages of the mapped .safetensors files `which(path)` picks (weights are
    loaded as private file mappings, resident as they are read): a weight no longer referenced stops counting, one
    still in use is read back from the file as it is touched, and a page written since (a weight pruned in place,
    private memory now) is not the file's to drop. Linux only; returns the mappings advised (0 elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/maps") as f:
            maps = [line.rstrip("\n").split(maxsplit=5) for line in f]  # the path may hold spaces
        ranges = [m[0] for m in maps if len(m) == 6 and m[5].endswith(".safetensors") and which(m[5])]
    except (OSError, AttributeError):
        return 0
    for r in ranges:
        start, end = (int(x, 16) for x in r.split("-"))
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)
    return len(ranges)


def page_out_beside_unet() -> int:
    """page_out_weights for every component's weights but the UNet's (the VAE's, the text encoders'): read for a
    check or the calibration, then idle while the UNet works."""
    return page_out_weights(lambda path: "/unet/" not in path)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_kb(key: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    kb = status_kb("VmHWM")
    return None if kb is None else round(kb / 1024, 1)


def stats_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {"n": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "mean_ms": round(float(ms.mean()), 4),
            "min_ms": round(float(ms.min()), 4)}


def interleaved(jobs: dict, warmup: int, iters: int, sync=lambda: None) -> dict[str, list[float]]:
    """Warm every job up, then time one call of each per round, ABBA order (a noisy, shared machine slows all
    alike); {name: [seconds...]}."""
    for fn in jobs.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in jobs}
    names = list(jobs)
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            jobs[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def component_feed(components: dict, component: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at the shape one generation uses: the manifest's opt shape (components: its "components"),
    batch 1 for the parts that run once per image."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shapes in components[component]["inputs"].items():
        shape = list(shapes["opt"])
        if component != "unet":
            shape[0] = max(1, shapes["min"][0])
        if name == "timestep":
            feed[name] = np.full(shape, 500.0, dtype=np.float32)
        elif name == "input_ids":  # token ids, int32 as diffusers' ONNX pipelines feed them; 256: in every vocab
            feed[name] = rng.integers(0, 256, shape).astype(np.int32)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def board() -> str | None:
    """The board's model string where the device tree has one (a Jetson: 'NVIDIA Jetson AGX Orin ...')."""
    try:
        with open("/proc/device-tree/model") as f:
            return f.read().strip("\x00\n ") or None
    except OSError:
        return None
