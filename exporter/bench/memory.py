"""Process memory figures from Linux /proc (no psutil): peak RSS (VmHWM) per block of work."""

from __future__ import annotations

import gc


def release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc keeps freed heap pages otherwise), so that the
    next figure starts from what is really alive."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
