"""The adapter interface every pipeline family implements, and what a family says about each ONNX component."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import torch

from tinyprune.model.families.latents import Latents

if TYPE_CHECKING:
    from tinyprune.model.pipeline import Pipeline


# The UNet's keyword arguments besides sample and timestep (encoder_hidden_states, added_cond_kwargs, ...): what a
# family conditions with, batch first in every tensor (nested dicts too), so that batches of it concatenate, index
# and repeat like tensors. Unconditional families condition with {}.
Cond = dict


def cat_cond(conds: list[Cond]) -> Cond:
    return {k: cat_cond([c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
            for k, v in conds[0].items()}


def take_cond(cond: Cond, index) -> Cond:
    return {k: take_cond(v, index) if isinstance(v, dict) else v[index] for k, v in cond.items()}


def repeat_cond(cond: Cond, copies: int) -> Cond:
    return {k: repeat_cond(v, copies) if isinstance(v, dict) else v.repeat(copies, *([1] * (v.dim() - 1)))
            for k, v in cond.items()}


def move_cond(cond: Cond | None, device) -> Cond | None:
    """The conditioning on `device`: the text encoders stay on the CPU, the UNet may run on a GPU."""
    if cond is None:
        return None
    return {k: move_cond(v, device) if isinstance(v, dict) else v.to(device) for k, v in cond.items()}


def flat_cond(cond: Cond) -> dict[str, torch.Tensor]:
    """The conditioning as the UNet's ONNX inputs see it: added_cond_kwargs' entries beside the others."""
    out = {}
    for k, v in cond.items():
        out.update(flat_cond(v) if isinstance(v, dict) else {k: v})
    return out


@dataclass(frozen=True)
class ComponentIO:
    """One ONNX component as its family defines it, from the model config (like optimum's OnnxConfig).

    shape(batch, latent) gives every input's shape at a latent size; spatial names, for each input and output
    with spatial axes 2 and 3, whether they follow the latent or the image size, so dynamic axes get distinct
    names for the two. int_ranges: inputs fed as integers drawn from [low, high) in dummy feeds (timesteps,
    token ids); dtypes: inputs that are not float32 (token ids are int32, as diffusers' ONNX pipelines feed them)."""

    name: str
    source: str  # the pipeline model that holds its weights
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    default_tolerance: float
    module: Callable[["Pipeline"], torch.nn.Module]
    shape: Callable[[int, int], dict[str, tuple[int, ...]]]
    spatial: dict[str, str]  # name -> "latent" | "image"
    int_ranges: dict[str, tuple[int, int]]
    dtypes: dict[str, str] = field(default_factory=dict)
    # inputs whose dummy values must come from the model (shape, rng) -> array: a VQ decoder's latents are
    # codebook entries, where a random latent would sit on argmin ties that float reordering flips
    feeds: dict[str, Callable[[tuple[int, ...], np.random.Generator], np.ndarray]] = field(default_factory=dict)

    def dummy_feed(self, batch: int, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feed = {}
        for name, shape in self.shape(batch, latent).items():
            dtype = np.dtype(self.dtypes.get(name, "float32"))
            if name in self.feeds:
                feed[name] = self.feeds[name](shape, rng).astype(dtype)
            elif name in self.int_ranges:
                feed[name] = rng.integers(*self.int_ranges[name], shape).astype(dtype)
            else:
                feed[name] = rng.standard_normal(shape).astype(dtype)
        return feed


class UNetModule(torch.nn.Module):
    """The UNet with positional ONNX inputs: sample, timestep, then the family's conditioning inputs by name
    (`added` of them go into added_cond_kwargs, as SDXL's text_embeds and time_ids)."""

    def __init__(self, unet, names: tuple[str, ...] = (), added: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.names, self.added = unet, names, added

    def forward(self, sample, timestep, *cond):
        kwargs = dict(zip(self.names, cond))
        added = {k: kwargs.pop(k) for k in self.added}
        if added:
            kwargs["added_cond_kwargs"] = added
        return self.unet(sample, timestep, **kwargs, return_dict=False)[0]


class Family:
    """What tinyprune may know about a pipeline, behind one interface. Methods take the loaded pipeline's parts
    through `self.pipe`; subclasses are registered in model/families/__init__.py.

    Class attributes say what a pipeline dir of the family holds: PIPELINES (model_index.json's _class_name),
    UNET (the denoiser's class), VAE (the latent codec's component name, None in pixel space; VAE_CLASSES the
    classes it may be), PARTS (the conditioning components and the class each loads with, in load order)."""

    name: ClassVar[str]
    PIPELINES: ClassVar[tuple[str, ...]] = ()
    UNET: ClassVar[str] = "UNet2DConditionModel"
    VAE: ClassVar[str | None] = "vae"
    VAE_CLASSES: ClassVar[tuple[str, ...]] = ("AutoencoderKL",)
    PARTS: ClassVar[dict[str, str]] = {}
    PRUNABLE_PARTS: ClassVar[tuple[str, ...]] = ()  # conditioning models --prune-text-encoder prunes
    CHECK_CONDITIONS: ClassVar[int] = 4  # conditions the image checks draw by default
    GUIDANCE: ClassVar[float] = 3.0  # the torch-free runtime's default guidance scale for the family's bundles

    def __init__(self, pipe: "Pipeline"):
        self.pipe = pipe

    @classmethod
    def tokenizers(cls) -> tuple[str, ...]:
        """The PARTS that are tokenizers (not models)."""
        return tuple(n for n in cls.PARTS if n.startswith("tokenizer"))

    @classmethod
    def accepts(cls, index: dict) -> bool:
        return index.get("_class_name") in cls.PIPELINES

    @classmethod
    def describe(cls) -> str:
        return ", ".join(cls.PIPELINES)

    @classmethod
    def part_class(cls, name: str) -> type:
        """The diffusers/transformers class a conditioning component loads with (from_pretrained)."""
        import importlib

        module, _, attr = cls.PARTS[name].rpartition(".")
        return getattr(importlib.import_module(module), attr)

    @classmethod
    def check_configs(cls, configs: dict[str, dict], where: str) -> None:
        """Refuse parts that cannot work together (a text encoder of the wrong width), from their config.json
        files alone, before any weight is read. configs: component name -> its config."""

    # ---- conditioning
    @property
    def latents(self) -> Latents:
        return Latents(self.pipe.vae)

    @property
    def guided(self) -> bool:
        """Whether sampling pairs every condition with null_condition (classifier-free guidance)."""
        return True

    def check_conditions(self, n: int | None = None) -> list:
        """The conditions image checks draw, in a fixed order: the first n (CHECK_CONDITIONS when None)."""
        raise NotImplementedError

    def calibration_conditions(self, n: int | None = None) -> list:
        """The conditions data-free calibration samples the dense model for (`n` of them; None: the family's
        default count)."""
        raise NotImplementedError

    def image_condition(self, caption: str | None):
        """The condition of a calibration image from its caption (None: it has none)."""
        raise NotImplementedError

    def condition(self, conditions: list, size: int | None = None) -> Cond:
        """The UNet's conditioning keyword arguments for a list of conditions: unet(x_t, t, **cond). size: the
        latent size sampled at (None: the UNet's native one), for families conditioned on it (SDXL's time_ids)."""
        raise NotImplementedError

    def null_condition(self, batch: int, size: int | None = None) -> Cond | None:
        """The unconditional conditioning classifier-free guidance pairs with every conditional one; None where
        the family samples without guidance."""
        raise NotImplementedError

    def example_condition(self, batch: int) -> Cond:
        """Conditioning of the right shapes for one forward pass (cost models, MAC counts)."""
        return self.condition(self.check_conditions(1) * batch)

    @property
    def context_tokens(self) -> int:
        """Cross-attention context length (0: no cross-attention)."""
        raise NotImplementedError

    # ---- latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.latents.decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents."""
        return self.latents.encode(images)

    # ---- components, runtime and yardstick
    def components(self) -> tuple[ComponentIO, ...]:
        raise NotImplementedError

    def latent_components(self) -> tuple[ComponentIO, ...]:
        """vae_encoder and vae_decoder, as the family's latent codec has them (none in pixel space)."""
        return self.latents.components(self.pipe.latent_channels)

    def onnx_index(self) -> dict | None:
        """The bundle's model_index.json, as the ecosystem's ONNX pipeline of the family loads it (None where there
        is none yet)."""
        return None

    def runtime_conditioning(self) -> tuple[dict, dict[str, str]]:
        """How the torch-free runtime conditions the UNet (runtime/conditioning.py): shapes.json's "conditioning"
        entry, and the text files it reads from runtime/ (name -> content)."""
        raise NotImplementedError

    def yardstick_conditions(self, digits: list[int]) -> list | None:
        """The conditions that ask this pipeline for each digit of `digits` (the digit yardstick's class accuracy
        and FD), or None when the family cannot be asked for a digit."""
        return None
