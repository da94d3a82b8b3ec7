"""Drift results that know their tolerance: truthy when within it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_rel": self.max_rel,
                "tolerance": self.tolerance, "ok": bool(self)}


@dataclass(frozen=True)
class ImageDrift:
    """Dense-vs-pruned (or PyTorch-vs-runtime) drift of final images in [0, 1], gated on PSNR."""

    name: str
    psnr_db: float
    max_abs: float
    min_psnr_db: float

    def __bool__(self) -> bool:
        return self.psnr_db >= self.min_psnr_db

    @staticmethod
    def of(name: str, ref: np.ndarray, got: np.ndarray, min_psnr_db: float) -> "ImageDrift":
        return ImageDrift(name, psnr(ref, got, 1.0), float(np.abs(ref - got).max()), min_psnr_db)

    def to_dict(self) -> dict:
        return {"name": self.name, "psnr_db": self.psnr_db if math.isfinite(self.psnr_db) else "inf",
                "max_abs": self.max_abs, "min_psnr_db": self.min_psnr_db, "ok": bool(self)}
