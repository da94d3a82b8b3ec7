"""Drift results that know their tolerance: truthy when within it.

to_dict() gives JSON-ready data: an infinite PSNR (identical images, max abs 0) is written as null, and so
is the PSNR of a skipped check (`skipped` true, `reason` says why); no figure is ever a string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Seed of every image check's initial noise: dense, pruned, ONNX and runtime images start from the same noise.
IMAGE_SEED = 0


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements, 10 log10(data_range^2 / MSE); inf for identical
    inputs (no cap: JSON writers map it). Arrays or CPU tensors of equal shape."""
    a, b = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


@dataclass(frozen=True)
class Drift:
    """ONNX-vs-reference drift of one output, gated on max abs difference."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    tolerance: float

    def __bool__(self) -> bool:
        return self.max_abs <= self.tolerance

    @staticmethod
    def of(name: str, ref: np.ndarray, got: np.ndarray, tolerance: float) -> "Drift":
        d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        rel = d / np.maximum(np.abs(ref), 1e-6)
        return Drift(name, float(d.max()), float(d.mean()), float(rel.max()), tolerance)

    def failures(self) -> list[str]:
        return [] if self else [self.name]

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_rel": self.max_rel,
                "tolerance": self.tolerance, "ok": bool(self)}


def finite_or_none(x: float | None) -> float | None:
    """A figure for JSON: inf (and NaN) become null, which every JSON reader takes (json.dump would write
    `Infinity`, which strict readers such as jq reject)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class ImageDrift:
    """Dense-vs-pruned (or PyTorch-vs-runtime) drift of final images in [0, 1], gated on PSNR.

    A check that did not run (ImageDrift.skip) has psnr_db and max_abs None and a reason; it applies no
    gate, so it is truthy."""

    name: str
    psnr_db: float | None
    max_abs: float | None
    min_psnr_db: float
    reason: str | None = None  # why the check was skipped; None when it ran

    @property
    def skipped(self) -> bool:
        return self.reason is not None

    def __bool__(self) -> bool:
        return self.skipped or self.psnr_db >= self.min_psnr_db

    @staticmethod
    def of(name: str, ref: np.ndarray, got: np.ndarray, min_psnr_db: float) -> "ImageDrift":
        return ImageDrift(name, psnr(ref, got, 1.0), float(np.abs(ref - got).max()), min_psnr_db)

    @staticmethod
    def skip(name: str, min_psnr_db: float, reason: str) -> "ImageDrift":
        """The check `name` was not run (e.g. reason "--image-checks 0"): no figures, no gate applied."""
        return ImageDrift(name, None, None, min_psnr_db, reason)

    def failures(self) -> list[str]:
        return [] if self else [self.name]

    def to_dict(self) -> dict:
        return {"name": self.name, "psnr_db": finite_or_none(self.psnr_db), "max_abs": self.max_abs,
                "min_psnr_db": self.min_psnr_db, "ok": bool(self), "skipped": self.skipped, "reason": self.reason}
