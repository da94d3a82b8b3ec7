"""The torch-free runtime judged against PyTorch: the bundle's own loop and the PyTorch pipeline make the same images
from the same seed, conditions and initial noise (DDIM), gated on the profile's min_runtime_psnr_db."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyprune.judge.drift import IMAGE_SEED, ImageDrift
from tinyprune.runtime.generate import RUNTIME_DIR, SHAPES_FILE

E2E_LABELS = 4  # conditions in the runtime-vs-PyTorch check: a numerical check, a few images suffice
RUNTIME_CHECK_BATCH = 2  # UNet batch of the runtime check: one guided condition


@dataclass(frozen=True)
class RuntimeReference:
    """The PyTorch pipeline's images for the runtime check and the conditions they were made for."""

    conditions: list
    images: np.ndarray
    latent: int | None = None  # the latent size they were sampled at; None: native


def runtime_check(bundle_dir: Path, ref: RuntimeReference | None, profile, what: str, steps: int | None = None):
    """runtime_drift(...), or a skipped ImageDrift (no gate) when ref is None (no image checks) or the bundle has
    no runtime/ (made by a tinyprune before the runtime covered its family)."""
    reason = None
    if ref is None:
        reason = "--image-checks 0"
    elif not (Path(bundle_dir) / RUNTIME_DIR / SHAPES_FILE).is_file():
        reason = "no runtime/ in this bundle: re-export it"
    if reason:
        return ImageDrift.skip(f"image runtime (ort-cpu) vs PyTorch, {what}", profile.min_runtime_psnr_db, reason)
    return runtime_drift(bundle_dir, ref, profile, what, steps)


def e2e_labels(pipe, n: int | None = None) -> list:
    """The first min(n, E2E_LABELS) of the family's check conditions (n: the export's --image-checks)."""
    return pipe.family.check_conditions(E2E_LABELS if n is None else min(n, E2E_LABELS))


def torch_e2e_reference(pipe, steps: int | None = None, n: int | None = None, latent: int | None = None,
                        samples=None, phase: str = "") -> RuntimeReference:
    """The PyTorch pipeline's images for the runtime check (tinyprune.model.sampling.sample, DDIM, seed IMAGE_SEED)
    at latent size `latent` (None: native); `samples`: a run's judge.checks.Samples, whose images of the same
    `phase` pipeline it reuses."""
    from tinyprune.judge.checks import Samples

    conditions = e2e_labels(pipe, n)
    return RuntimeReference(conditions, (samples or Samples())(pipe, phase, conditions, steps, latent), latent)


def runtime_drift(bundle_dir: Path, ref: RuntimeReference, profile, what: str, steps: int | None = None,
                  backend: str = "ort-cpu"):
    """The runtime's images (same seed, conditions and initial noise, DDIM, the reference's guidance: an LCM's
    embedded one is the family's own) against PyTorch's `ref`; an ImageDrift gated on profile.min_runtime_psnr_db."""
    from tinyprune.runtime.generate import Runtime
    from tinyprune.model.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

    with Runtime(bundle_dir, backend, one_at_a_time=True) as rt:  # one session at a time: the check's peak
        # one condition per UNet call (with its unguided twin): at Stable Diffusion's size the four conditions' batch
        # of 8 held 11.6 GiB of onnxruntime's attention activations; DDIM makes the same images from the same noise
        rt.max_batch = min(rt.max_batch or RUNTIME_CHECK_BATCH, RUNTIME_CHECK_BATCH)
        guidance = DEFAULT_GUIDANCE if rt.conditioning.guided else None
        got = rt.generate(list(ref.conditions), seed=IMAGE_SEED, steps=steps or DEFAULT_STEPS, scheduler="ddim",
                          guidance=guidance, size=ref.latent)
    return ImageDrift.of(f"image runtime ({backend}) vs PyTorch, {what}", ref.images, got, profile.min_runtime_psnr_db)
