"""The PyTorch reference generation loop: DDIM (eta 0) with classifier-free guidance where the family guides
(an LCM embeds its guidance, unconditional families have none), conditioned through the pipeline's family adapter. The reference is DDIM whatever sampler the pipeline ships, because the torch-free
runtime's checks reproduce it step for step.

Initial noise comes from numpy's generator so that the torch-free runtime reproduces it bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler

from tinyprune.model.families import cat_cond, move_cond
from tinyprune.model.pipeline import Pipeline
from tinyprune.runtime.measure import page_out_beside_unet

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def initial_noise(seed: int, batch: int, channels: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32)


@torch.inference_mode()
def sample(pipe: Pipeline, conditions: list, seed: int = 0, steps: int = DEFAULT_STEPS,
           guidance: float = DEFAULT_GUIDANCE, size: int | None = None) -> torch.Tensor:
    """Images in [0, 1], shape [B, 3, H, W], for the given conditions (latent size: native unless given)."""
    latents = sample_latents(pipe, conditions, seed, steps, guidance, size=size)
    return (pipe.family.decode(latents) / 2 + 0.5).clamp(0, 1)


@torch.inference_mode()
def sample_latents(pipe: Pipeline, conditions: list, seed: int = 0, steps: int = DEFAULT_STEPS,
                   guidance: float = DEFAULT_GUIDANCE, size: int | None = None) -> torch.Tensor:
    """The denoised, scaled latents (what the VAE decoder's ONNX input takes)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    b = len(conditions)
    device = next(pipe.unet.parameters()).device  # the prune stage may host the UNet on a GPU (text encoders: CPU)
    latents = torch.from_numpy(initial_noise(seed, b, pipe.latent_channels, size or pipe.latent_size)).to(device)
    latents = latents * scheduler.init_noise_sigma
    family = pipe.family
    cond = move_cond(family.condition(conditions, size), device)
    uncond = move_cond(family.null_condition(b, size), device)
    # the loop reads the UNet only: the text encoders' file pages, just read, stop counting (0.46 GiB at SD-1.5 size)
    page_out_beside_unet()
    for t in scheduler.timesteps:
        eps = guided_eps(pipe.unet, scheduler.scale_model_input(latents, t), t, cond, uncond, guidance)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents.cpu()


def guided_eps(unet, x: torch.Tensor, t, cond, uncond, guidance: float) -> torch.Tensor:
    """The UNet's prediction for x, with classifier-free guidance (one batch [uncond, cond]) when uncond is not
    None, else one plain call."""
    if uncond is None:
        return unet(x, t, **cond).sample
    eps_u, eps_c = unet(torch.cat([x, x]), t, **cat_cond([uncond, cond])).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)
