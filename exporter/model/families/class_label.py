"""The class-conditioned family (the shipped demo): UNet2DConditionModel + AutoencoderKL + a class embedder.

A label becomes the cross-attention context through ClassEmbedder's table; the row after the last class is the
null class that classifier-free guidance pairs with every label.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from tinyprune.model.families.base import ComponentIO, Cond, Family


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Class label -> cross-attention context, with a null class (index num_classes) for guidance."""

    @register_to_config
    def __init__(self, num_classes: int = 10, embed_dim: int = 64, seq_len: int = 1):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, embed_dim * seq_len)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(labels.shape[0], self.config.seq_len, self.config.embed_dim)


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


class ClassLabelFamily(Family):
    name = "class-conditioned"
    CONDITIONER = "class_embedder"

    @classmethod
    def accepts(cls, index: dict) -> bool:
        return cls.CONDITIONER in index and (index.get("unet") or [None, None])[1] == "UNet2DConditionModel"

    @classmethod
    def describe(cls) -> str:
        return "UNet2DConditionModel + AutoencoderKL + class_embedder, as the shipped demo"

    @classmethod
    def conditioner_class(cls) -> type:
        return ClassEmbedder

    @property
    def embedder(self) -> ClassEmbedder:
        return self.pipe.conditioner

    def check_conditions(self, n: int | None = None) -> list[int]:
        classes = self.embedder.config.num_classes
        return list(range(classes if n is None else min(n, classes)))

    def condition(self, conditions: list[int]) -> Cond:
        return {"encoder_hidden_states": self.embedder(torch.as_tensor(conditions, dtype=torch.long))}

    def null_condition(self, batch: int) -> Cond:
        return {"encoder_hidden_states": self.embedder(torch.full((batch,), self.embedder.null_class,
                                                                  dtype=torch.long))}

    @property
    def context_tokens(self) -> int:
        return int(self.embedder.config.seq_len)

    def yardstick_classes(self) -> int | None:
        return int(self.embedder.config.num_classes)

    def components(self) -> tuple[ComponentIO, ...]:
        pipe = self.pipe
        ctx = self.embedder.config
        latent_ch, image_ch, scale = pipe.latent_channels, pipe.vae.config.in_channels, pipe.vae_scale
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        unet = ComponentIO(
            "unet", "unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",), 1e-3,
            lambda p: UNetModule(p.unet),
            lambda b, h: {"sample": (b, latent_ch, h, h), "timestep": (b,),
                          "encoder_hidden_states": (b, ctx.seq_len, ctx.embed_dim)},
            {"sample": "latent", "out_sample": "latent"}, {"timestep": (0, n_train)})
        encoder = ComponentIO(
            "vae_encoder", "vae", ("image",), ("latent",), 1e-3, lambda p: VaeEncoderModule(p.vae),
            lambda b, h: {"image": (b, image_ch, h * scale, h * scale)}, {"image": "image", "latent": "latent"}, {})
        decoder = ComponentIO(
            "vae_decoder", "vae", ("latent",), ("image",), 5e-3, lambda p: VaeDecoderModule(p.vae),
            lambda b, h: {"latent": (b, pipe.vae.config.latent_channels, h, h)},
            {"latent": "latent", "image": "image"}, {})
        return unet, encoder, decoder

    def runtime_conditioning(self) -> tuple[dict[str, np.ndarray], dict]:
        cfg = self.embedder.config
        table = self.embedder.embedding.weight.detach().float().cpu().numpy().astype(np.float32)
        arrays = {"table": table, "seq_len": np.int64(cfg.seq_len), "embed_dim": np.int64(cfg.embed_dim),
                  "null_class": np.int64(self.embedder.null_class)}
        return arrays, {"num_classes": int(cfg.num_classes)}
