"""Calibration batches (x_t, t, cond, noise) for data-driven importance scores and recovery.

Two sources: a folder of images encoded by the pipeline's own VAE, or — when the training data is not
at hand — data-free, from the dense model's own samples for the classes listed in calibration/.
Timesteps are stratified over the training range so every batch covers early and late denoising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from tinyprune.errors import InputError
from tinyprune.model.families import Cond
from tinyprune.model.pipeline import Pipeline
from tinyprune.model.sampling import sample_latents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Batch:
    x_t: torch.Tensor  # noised latents
    t: torch.Tensor  # timesteps, long
    cond: Cond  # the UNet's conditioning keyword arguments (the family's): unet(x_t, t, **cond)
    noise: torch.Tensor  # the epsilon target
    x0: torch.Tensor  # clean latents (LD-Pruner-style scores compare outputs against them)


@dataclass(frozen=True)
class CalibrationSet:
    """Clean latents with their labels; batches() noises them reproducibly."""

    latents: torch.Tensor
    labels: torch.Tensor
    source: str

    def batches(self, pipe: Pipeline, batch_size: int = 16, seed: int = 0) -> list[Batch]:
        g = torch.Generator().manual_seed(seed)
        sched = pipe.noise_scheduler
        n_train = sched.config.num_train_timesteps
        out = []
        for start in range(0, len(self.latents), batch_size):
            x0 = self.latents[start:start + batch_size]
            b = len(x0)
            # one timestep per stratum of [0, n_train): every batch spans the whole trajectory
            edges = torch.linspace(0, n_train, b + 1)
            t = (edges[:-1] + torch.rand(b, generator=g) * (edges[1:] - edges[:-1])).long().clamp_max(n_train - 1)
            noise = torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                cond = pipe.family.condition(self.labels[start:start + b])
            out.append(Batch(sched.add_noise(x0, noise, t), t, cond, noise, x0))
        return out


def default_classes() -> list[int]:
    data = json.loads(resources.files("tinyprune.calibration_data").joinpath("classes.json").read_text())
    return list(data["classes"])


def from_samples(pipe: Pipeline, per_class: int = 4, classes: list[int] | None = None, seed: int = 0,
                 steps: int = 20) -> CalibrationSet:
    """Data-free: the dense model's own samples for each listed class."""
    classes = default_classes() if classes is None else classes
    labels = [c for c in classes for _ in range(per_class)]
    latents = torch.cat([sample_latents(pipe, labels[i:i + 20], seed=seed + i, steps=steps)
                         for i in range(0, len(labels), 20)])
    return CalibrationSet(latents, torch.tensor(labels), "samples")


def from_images(pipe: Pipeline, folder: str | Path, label: int | None = None, limit: int = 256) -> CalibrationSet:
    """Images of a folder through the VAE encoder. Sub-folders named by class index give labels;
    otherwise every image gets `label` (default: the null class, i.e. unconditional)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise InputError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    size = pipe.latent_size * pipe.vae_scale
    null = pipe.conditioner.null_class if label is None else label  # class-conditioned family only
    images, labels = [], []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        except OSError as e:
            raise InputError(f"calibration image {p} could not be read ({e})") from None
        images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        parent = p.parent.name
        labels.append(int(parent) if parent.isdigit() and p.parent != folder else null)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = torch.cat([pipe.family.encode_images(x[i:i + 32]) for i in range(0, len(x), 32)])
    return CalibrationSet(latents, torch.tensor(labels), f"images:{folder.name}")


def calibration_batches(pipe: Pipeline, folder: str | Path | None = None, seed: int = 0,
                        batch_size: int = 16) -> list[Batch]:
    """The batches pruning reads: from an image folder when given, else data-free from the dense model."""
    cal = from_images(pipe, folder) if folder is not None else from_samples(pipe, seed=seed)
    return cal.batches(pipe, batch_size=batch_size, seed=seed)
