"""The adapter interface every pipeline family implements, and what a family says about each ONNX component."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from tinyprune.model.pipeline import Pipeline


# The UNet's keyword arguments besides sample and timestep (encoder_hidden_states, ...): what a family conditions
# with, batch first in every tensor, so that batches of it concatenate, index and repeat like tensors.
Cond = dict[str, torch.Tensor]


def cat_cond(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def take_cond(cond: Cond, index) -> Cond:
    return {k: v[index] for k, v in cond.items()}


def repeat_cond(cond: Cond, copies: int) -> Cond:
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in cond.items()}


@dataclass(frozen=True)
class ComponentIO:
    """One ONNX component as its family defines it, from the model config (like optimum's OnnxConfig).

    shape(batch, latent) gives every input's shape at a latent size; spatial names, for each input and output
    with spatial axes 2 and 3, whether they follow the latent or the image size, so dynamic axes get distinct
    names for the two. int_ranges: inputs fed as integers drawn from [low, high) in dummy feeds (timesteps)."""

    name: str
    source: str  # the pipeline model that holds its weights
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    default_tolerance: float
    module: Callable[["Pipeline"], torch.nn.Module]
    shape: Callable[[int, int], dict[str, tuple[int, ...]]]
    spatial: dict[str, str]  # name -> "latent" | "image"
    int_ranges: dict[str, tuple[int, int]]


class Family:
    """What tinyprune may know about a pipeline, behind one interface. Methods take the loaded pipeline's parts
    through `self.pipe`; subclasses are registered in model/families/__init__.py."""

    name: ClassVar[str]
    CONDITIONER: ClassVar[str]  # the pipeline component that conditions the UNet

    def __init__(self, pipe: "Pipeline"):
        self.pipe = pipe

    @classmethod
    def accepts(cls, index: dict) -> bool:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        raise NotImplementedError

    @classmethod
    def conditioner_class(cls) -> type:
        """The diffusers/transformers class the conditioner component loads with (from_pretrained)."""
        raise NotImplementedError

    # ---- conditioning
    def check_conditions(self, n: int | None = None) -> list:
        """The conditions image checks draw, in a fixed order: the first n (all the family has when None)."""
        raise NotImplementedError

    def condition(self, conditions: list) -> Cond:
        """The UNet's conditioning keyword arguments for a list of conditions: unet(x_t, t, **cond)."""
        raise NotImplementedError

    def null_condition(self, batch: int) -> Cond:
        """The unconditional conditioning classifier-free guidance pairs with every conditional one."""
        raise NotImplementedError

    @property
    def context_tokens(self) -> int:
        raise NotImplementedError

    # ---- latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor).sample

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the mean of the posterior)."""
        vae = self.pipe.vae
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor

    # ---- components, runtime and yardstick
    def components(self) -> tuple[ComponentIO, ...]:
        raise NotImplementedError

    def runtime_conditioning(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays the torch-free runtime conditions with, and the entries it adds to runtime/shapes.json."""
        raise NotImplementedError

    def yardstick_classes(self) -> int | None:
        """Classes the digit yardstick scores (class accuracy, FD per class), or None when it does not apply."""
        return None
