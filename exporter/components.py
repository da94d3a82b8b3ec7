"""Per-component export specs: the wrapper module, input/output names, shapes and tolerances.

Shapes are written in terms of batch b and latent size h (pixels = h * vae_scale), so one function
gives both the dummy inputs for export and the min/opt/max shapes TensorRT profiles need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import DeviceProfile, ExportSpec
from .pipeline import Pipeline


class UNetModule(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeEncoderModule(torch.nn.Module):
    """image in [-1, 1] -> scaled latent mean (what the UNet consumes)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor


class VaeDecoderModule(torch.nn.Module):
    """scaled latent -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    default_tolerance: float
    module: Callable[[Pipeline], torch.nn.Module]
    # input name -> shape as a function of (pipe, batch, latent size)
    shape: Callable[[Pipeline, int, int], dict[str, tuple[int, ...]]]
    source: str  # which pipeline model holds its weights: "unet" or "vae"

    def tolerance(self, profile: DeviceProfile) -> float:
        return profile.tolerance.get(self.name, self.default_tolerance)

    def dummy_feed(self, pipe: Pipeline, batch: int, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feed = {}
        for name, shape in self.shape(pipe, batch, latent).items():
            if name == "timestep":
                feed[name] = rng.integers(0, pipe.scheduler.config.num_train_timesteps, shape).astype(np.float32)
            else:
                feed[name] = rng.standard_normal(shape).astype(np.float32)
        return feed

    def trt_shapes(self, pipe: Pipeline, spec: ExportSpec) -> dict[str, dict[str, list[int]]]:
        at = {k: self.shape(pipe, getattr(spec.batch, k), getattr(spec.latent, k)) for k in ("min", "opt", "max")}
        return {name: {k: list(at[k][name]) for k in at} for name in self.inputs}

    def dynamic_axes(self, spec: ExportSpec) -> dict[str, dict[int, str]]:
        spatial = spec.latent.min != spec.latent.max
        axes = {}
        for name in self.inputs + self.outputs:
            axes[name] = {0: "batch"}
            if spatial and name not in ("timestep", "encoder_hidden_states"):
                axes[name].update({2: "height", 3: "width"})
        return axes


def _unet_shape(pipe, b, h):
    ctx = pipe.conditioner.config
    return {
        "sample": (b, pipe.latent_channels, h, h),
        "timestep": (b,),
        "encoder_hidden_states": (b, ctx.seq_len, ctx.embed_dim),
    }


UNET = ComponentSpec(
    "unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",), 1e-3,
    lambda p: UNetModule(p.unet), _unet_shape, "unet",
)
VAE_ENCODER = ComponentSpec(
    "vae_encoder", ("image",), ("latent",), 1e-3,
    lambda p: VaeEncoderModule(p.vae),
    lambda p, b, h: {"image": (b, p.vae.config.in_channels, h * p.vae_scale, h * p.vae_scale)}, "vae",
)
VAE_DECODER = ComponentSpec(
    "vae_decoder", ("latent",), ("image",), 5e-3,
    lambda p: VaeDecoderModule(p.vae),
    lambda p, b, h: {"latent": (b, p.vae.config.latent_channels, h, h)}, "vae",
)
COMPONENTS = (UNET, VAE_ENCODER, VAE_DECODER)


def export_spec(pipe: Pipeline, profile: DeviceProfile, max_opset: int) -> ExportSpec:
    from .config import Range

    native = pipe.latent_size
    latent = profile.latent or Range(native, native, native)
    return ExportSpec(opset=min(profile.max_opset, max_opset), batch=profile.batch, latent=latent)
