"""Latents and images: the codec a family denoises in (AutoencoderKL, AutoencoderTiny, VQModel, or none in pixel
space), and its vae_encoder / vae_decoder ONNX components.

Every codec is used as diffusers' own pipelines use it: latents are scaled by the codec's scaling_factor (1.0 for
TAESD), decoded with decode(latents / scaling_factor) (a VQModel quantizes inside decode, as LDMPipeline relies
on); encoding takes the posterior mean of an AutoencoderKL and the encoder's latents otherwise.

The ONNX components are optimum's and diffusers' ONNX pipelines': unscaled latents, the caller scales
(vae_encoder `sample` -> `latent_sample`, vae_decoder `latent_sample` -> `sample`, images in [-1, 1]).
"""

from __future__ import annotations

import numpy as np
import torch


class EncoderModule(torch.nn.Module):
    """image in [-1, 1] -> unscaled latent (the posterior mean; the caller multiplies by scaling_factor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return encode_unscaled(self.vae, sample)


class DecoderModule(torch.nn.Module):
    """unscaled latent (the caller divides by scaling_factor) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample).sample


def encode_unscaled(vae, images: torch.Tensor) -> torch.Tensor:
    out = vae.encode(images)
    dist = getattr(out, "latent_dist", None)
    return dist.mean if dist is not None else out.latents


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    return encode_unscaled(vae, images) * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / vae.config.scaling_factor).sample


class Latents:
    """The codec of one pipeline; vae None = pixel space (DDPM): latents are the images."""

    def __init__(self, vae):
        self.vae = vae

    @property
    def scale(self) -> int:
        """Image pixels per latent pixel."""
        if self.vae is None:
            return 1
        cfg = self.vae.config
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def image_channels(self) -> int | None:
        return None if self.vae is None else int(self.vae.config.out_channels)

    @property
    def has_encoder(self) -> bool:
        """VQModel pipelines (LDM) are sampled from noise only: their bundle has no vae_encoder, as DESIGN.md's
        family table lists."""
        return self.vae is not None and type(self.vae).__name__ != "VQModel"

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.vae is None else decode(self.vae, latents)

    def codebook_latents(self, shape: tuple[int, ...], rng) -> np.ndarray:
        """Unscaled latents whose every pixel is a VQ codebook entry (what the UNet is trained to land on)."""
        codebook = self.vae.quantize.embedding.weight.detach().float().cpu().numpy()
        b, c, h, w = shape
        pixels = codebook[rng.integers(0, len(codebook), (b, h, w))]  # [b, h, w, c]
        return pixels.transpose(0, 3, 1, 2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.vae is None else encode(self.vae, images)

    def components(self, latent_channels: int) -> tuple:
        from tinyprune.model.families.base import ComponentIO

        if self.vae is None:
            return ()
        scale, image_ch = self.scale, int(self.vae.config.in_channels)
        decoder = ComponentIO(
            "vae_decoder", "vae", ("latent_sample",), ("sample",), 5e-3, lambda p: DecoderModule(p.vae),
            lambda b, h: {"latent_sample": (b, latent_channels, h, h)}, {"latent_sample": "latent", "sample": "image"},
            {}, feeds={"latent_sample": self.codebook_latents} if not self.has_encoder else {})
        if not self.has_encoder:
            return (decoder,)
        encoder = ComponentIO(
            "vae_encoder", "vae", ("sample",), ("latent_sample",), 1e-3, lambda p: EncoderModule(p.vae),
            lambda b, h: {"sample": (b, image_ch, h * scale, h * scale)}, {"sample": "image", "latent_sample": "latent"},
            {})
        return encoder, decoder
