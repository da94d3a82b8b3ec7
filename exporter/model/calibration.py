"""Calibration batches (x_t, t, cond, noise) for data-driven importance scores and recovery.

Two sources: a folder of images encoded by the pipeline's own VAE (with captions for text families), or -- when
the training data is not at hand -- data-free, from the dense model's own samples for the family's calibration
conditions (the pipeline's own prompts.txt or calibration/prompts.txt for text families, noise alone for
unconditional ones). Timesteps are stratified over the
training range so every batch covers early and late denoising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyprune.config import work_latent
from tinyprune.errors import InputError
from tinyprune.model.families import Cond, move_cond
from tinyprune.model.pipeline import Pipeline
from tinyprune.model.sampling import sample_latents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Data-free samples by default past config.CHECK_WORK: each is 20 guided UNet calls, and a 2:4 ranking reads
# every calibration latent once per eligible layer (SD-1.5: about 220 layers)
LARGE_MODEL_CALIBRATION = 8


@dataclass(frozen=True)
class Batch:
    x_t: torch.Tensor  # noised latents
    t: torch.Tensor  # timesteps, long
    cond: Cond  # the UNet's conditioning keyword arguments (the family's): unet(x_t, t, **cond)
    noise: torch.Tensor  # the epsilon target
    x0: torch.Tensor  # clean latents (LD-Pruner-style scores compare outputs against them)

    def to(self, device) -> "Batch":
        return Batch(self.x_t.to(device), self.t.to(device), move_cond(self.cond, device), self.noise.to(device),
                     self.x0.to(device))


@dataclass(frozen=True)
class CalibrationSet:
    """Clean latents with their conditions (the family's: class labels, prompts, None); batches() noises them
    reproducibly."""

    latents: torch.Tensor
    conditions: list
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
            with torch.no_grad():  # at the latents' size (SDXL's time_ids say it)
                cond = pipe.family.condition(self.conditions[start:start + b], x0.shape[-1])
            out.append(Batch(sched.add_noise(x0, noise, t), t, cond, noise, x0))
        return out


def from_samples(pipe: Pipeline, conditions: list | None = None, seed: int = 0, steps: int = 20,
                 n: int | None = None, size: int | None = None) -> CalibrationSet:
    """Data-free: the dense model's own samples, one per condition (default: `n` of the family's calibration
    conditions, or its default set), at latent size `size` (None: native)."""
    conditions = pipe.family.calibration_conditions(n) if conditions is None else list(conditions)
    latents = torch.cat([sample_latents(pipe, conditions[i:i + 20], seed=seed + i, steps=steps, size=size)
                         for i in range(0, len(conditions), 20)])
    return CalibrationSet(latents, conditions, "samples")


def captions(folder: Path) -> dict[Path, str]:
    """Captions of a folder's images: metadata.jsonl lines {"file_name", "text"} (the Hugging Face imagefolder
    layout) and, beside an image, a .txt file of the same stem (which wins)."""
    out = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[(folder / row["file_name"]).resolve()] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{meta}:{n} is not a JSON object with file_name and text") from None
    for txt in folder.rglob("*.txt"):
        for suffix in IMAGE_SUFFIXES:
            image = txt.with_suffix(suffix)
            if image.is_file():
                out[image.resolve()] = txt.read_text(encoding="utf-8").strip()
    return out


def from_images(pipe: Pipeline, folder: str | Path, limit: int = 256, size: int | None = None) -> CalibrationSet:
    """Images of a folder through the VAE encoder, each with the family's condition for it: its caption (text
    families; metadata.jsonl or a same-stem .txt, "" when it has none), nothing (unconditional families). Resized
    to the model's image size, or to latent size `size`'s."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise InputError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    size, family, texts = (size * pipe.vae_scale if size else pipe.image_size), pipe.family, captions(folder)
    images, conditions = [], []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        except OSError as e:
            raise InputError(f"calibration image {p} could not be read ({e})") from None
        images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        conditions.append(family.image_condition(texts.get(p.resolve())))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = torch.cat([family.encode_images(x[i:i + 32]) for i in range(0, len(x), 32)])
    return CalibrationSet(latents, conditions, f"images:{folder.name}")


def calibration_latent(pipe: Pipeline) -> int | None:
    """The latent size calibration works at: config.work_latent's for a UNet past CHECK_WORK at its native
    size (SD-1.5: 16), None (native) for the others."""
    return work_latent(pipe.unet_params, pipe.latent_size)


def calibration_batches(pipe: Pipeline, folder: str | Path | None = None, seed: int = 0,
                        batch_size: int = 16, samples: int | None = None, default: int | None = None) -> list[Batch]:
    """The batches pruning reads: from an image folder when given (at most `samples` images, default 256), else
    data-free from the dense model (`samples` of its own samples; by default `default` of them, None: the family's
    calibration set; LARGE_MODEL_CALIBRATION past CHECK_WORK). Large UNets calibrate at calibration_latent()."""
    size = calibration_latent(pipe)
    if folder is not None:
        cal = from_images(pipe, folder, size=size, **({"limit": samples} if samples else {}))
    else:
        cal = from_samples(pipe, seed=seed, n=samples or (LARGE_MODEL_CALIBRATION if size else default), size=size)
    return cal.batches(pipe, batch_size=batch_size, seed=seed)
