"""Quality gates on the digit yardstick: FD ratio to dense, class accuracy, PSNR/SSIM, the sample grid.

The yardstick (judge/quality.py) knows digits: it applies to pipelines whose family adapter can be asked for a
digit (text-conditioned ones, prompted with the demo's held-out phrasings) and whose RGB images are the classifier's
size or a whole multiple of it — the shipped demo and pipelines like it.
For any other pipeline the report says the quality gates were not applied, instead of inventing figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tinyprune.config import DeviceProfile
from tinyprune.judge.drift import finite_or_none

if TYPE_CHECKING:  # the results here import without torch (bench's budgets)
    from tinyprune.model.pipeline import Pipeline

QUALITY_SEED = 1000
# 10 per class = 100 samples: FD from 100 samples is biased upwards, the same for dense and pruned, so
# the ratio is what the gate reads; sweeps and benchmarks use more.
DEFAULT_QUALITY_PER_CLASS = 10  # apart from the drift check's seed: the two checks sample different noise


@dataclass(frozen=True)
class Samples:
    labels: list[int]  # the digit each image was asked for
    conditions: list  # what the pipeline was conditioned on (the prompts)
    images: np.ndarray  # [N, 3, H, W] in [0, 1]


@dataclass(frozen=True)
class QualityResult:
    n_samples: int
    dense_fd: float
    pruned_fd: float
    dense_accuracy: float
    pruned_accuracy: float
    psnr_db: float
    ssim: float
    max_fd_ratio: float
    min_accuracy: float

    @property
    def fd_ratio(self) -> float:
        return self.pruned_fd / self.dense_fd if self.dense_fd > 0 else math.inf

    @property
    def fd_ok(self) -> bool:
        return self.fd_ratio <= self.max_fd_ratio

    @property
    def accuracy_ok(self) -> bool:
        return self.pruned_accuracy >= self.min_accuracy

    def __bool__(self) -> bool:
        return self.fd_ok and self.accuracy_ok

    def failures(self) -> list[str]:
        out = []
        if not self.fd_ok:
            out.append(f"FD ratio {self.fd_ratio:.3f} > {self.max_fd_ratio:g}")
        if not self.accuracy_ok:
            out.append(f"class accuracy {self.pruned_accuracy:.3f} < {self.min_accuracy:g}")
        return out

    def to_dict(self) -> dict:
        """JSON-ready: an infinite fd_ratio (dense FD 0) or psnr_db (identical samples) is null."""
        return {"n_samples": self.n_samples, "dense": {"fd": self.dense_fd, "accuracy": self.dense_accuracy},
                "pruned": {"fd": self.pruned_fd, "accuracy": self.pruned_accuracy},
                "fd_ratio": finite_or_none(self.fd_ratio), "psnr_db": finite_or_none(self.psnr_db),
                "ssim": self.ssim, "max_fd_ratio": self.max_fd_ratio, "min_accuracy": self.min_accuracy,
                "fd_ok": self.fd_ok, "accuracy_ok": self.accuracy_ok, "ok": bool(self)}


@dataclass(frozen=True)
class LatencyBudget:
    """One latency budget of the profile (latency_budget_ms) against the pruned model's measured p50."""

    key: str  # the budget's name in the profile: "unet" | "generation"
    budget_ms: float
    p50_ms: float

    def __bool__(self) -> bool:
        return self.p50_ms <= self.budget_ms

    def failures(self) -> list[str]:
        return [] if self else [f"{self.key} p50 {self.p50_ms:.3g} ms > {self.budget_ms:.3g} ms"]

    def to_dict(self) -> dict:
        return {"budget_ms": self.budget_ms, "p50_ms": self.p50_ms, "ok": bool(self)}


def applies(pipe: Pipeline) -> str | None:
    """None when the digit yardstick fits this pipeline, else why not."""
    from tinyprune.judge.quality import load_classifier

    clf = load_classifier()
    size, side = pipe.latent_size * pipe.vae_scale, int(clf.config.get("image_size", 32))
    if pipe.family.yardstick_conditions([0]) is None:
        return f"a {pipe.family.name} pipeline cannot be asked for a digit (the yardstick needs prompts)"
    channels = pipe.vae.config.out_channels if pipe.vae is not None else pipe.unet.config.out_channels
    if size % side or channels != 3:
        return f"the pipeline makes {size}x{size} images, the digit classifier reads {side}x{side} RGB (or multiples)"
    return None


def why_skipped(pipe: Pipeline, per_class: int | None, is_demo: bool) -> str | None:
    """None when the quality gates run: by default on the demo pipeline, on request (--quality N) on others."""
    if per_class == 0:
        return "--quality 0"
    if per_class is None and not is_demo:
        return "they apply to the demo pipeline by default; --quality N applies the digit yardstick to this one"
    return applies(pipe)


def draw(pipe: Pipeline, per_class: int, steps: int = 20, seed: int = QUALITY_SEED) -> Samples:
    """per_class images of every digit, each asked for by one of the demo's held-out phrasings."""
    from tinyprune.judge.quality import NUM_DIGITS, conditions_for, generate

    labels = list(range(NUM_DIGITS)) * per_class
    return Samples(labels, conditions_for(pipe, labels), generate(pipe, labels, seed=seed, steps=steps))


def draw_runtime(bundle: Path, like: Samples, steps: int = 20, seed: int = QUALITY_SEED) -> Samples:
    """The samples of `like` (labels, conditions, batches and their seeds as judge/quality.py's generate draws them)
    from the bundle's torch-free runtime: how a bundle whose files are not fp32 (fp16, int8) is judged."""
    from tinyprune.judge.quality import DEFAULT_BATCH, in_batches
    from tinyprune.model.sampling import DEFAULT_GUIDANCE
    from tinyprune.runtime.generate import Runtime

    with Runtime(bundle, "ort-cpu") as rt:
        images = in_batches(like.conditions, seed, DEFAULT_BATCH,
                            lambda part, s: rt.generate(part, seed=s, steps=steps, scheduler="ddim",
                                                        guidance=DEFAULT_GUIDANCE))
    return Samples(like.labels, like.conditions, images)


def judge(dense: Samples, pruned: Samples, profile: DeviceProfile, max_fd_ratio: float | None = None,
          min_accuracy: float | None = None) -> QualityResult:
    from tinyprune.judge.drift import psnr
    from tinyprune.judge.quality import class_accuracy, features, frechet_distance, load_classifier, real_digits, ssim

    clf = load_classifier()
    real = features(clf, real_digits()[0])
    return QualityResult(
        n_samples=len(dense.labels),
        dense_fd=frechet_distance(features(clf, dense.images), real),
        pruned_fd=frechet_distance(features(clf, pruned.images), real),
        dense_accuracy=class_accuracy(clf, dense.images, dense.labels),
        pruned_accuracy=class_accuracy(clf, pruned.images, pruned.labels),
        psnr_db=psnr(dense.images, pruned.images, 1.0),
        ssim=ssim(dense.images, pruned.images),
        max_fd_ratio=profile.max_fd_ratio if max_fd_ratio is None else max_fd_ratio,
        min_accuracy=profile.min_accuracy if min_accuracy is None else min_accuracy,
    )


def write_grid(dense: Samples, pruned: Samples, path: Path, columns: int = 10) -> Path:
    """Dense row over pruned row, the prompt under each column."""
    from tinyprune.judge.quality import sample_grid

    return sample_grid(dense.images[:columns], pruned.images[:columns], path,
                       captions=[str(c) for c in dense.conditions[:columns]])
