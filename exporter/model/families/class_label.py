"""The class-conditioned family (the shipped demo): UNet2DConditionModel + AutoencoderKL + a class embedder.

A label becomes the cross-attention context through ClassEmbedder's table; the row after the last class is the
null class that classifier-free guidance pairs with every label.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from tinyprune.model.families.base import ComponentIO, Cond, Family, UNetModule


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


class ClassLabelFamily(Family):
    name = "class-conditioned"
    CONDITIONER = "class_embedder"
    PARTS = {"class_embedder": "tinyprune.model.families.class_label.ClassEmbedder"}
    CHECK_CONDITIONS = 10  # every class

    @classmethod
    def accepts(cls, index: dict) -> bool:
        return cls.CONDITIONER in index and (index.get("unet") or [None, None])[1] == "UNet2DConditionModel"

    @classmethod
    def describe(cls) -> str:
        return "the shipped demo's class-conditioned pipeline (class_embedder)"

    @classmethod
    def check_configs(cls, configs: dict[str, dict], where: str) -> None:
        from tinyprune.errors import InputError

        width, ctx = configs["unet"].get("cross_attention_dim"), configs["class_embedder"].get("embed_dim")
        if width != ctx:
            raise InputError(f"{where}: class_embedder embeds to width {ctx} but the UNet's cross_attention_dim "
                             f"is {width}")

    @property
    def embedder(self) -> ClassEmbedder:
        return self.pipe.parts["class_embedder"]

    def check_conditions(self, n: int | None = None) -> list[int]:
        classes = self.embedder.config.num_classes
        return list(range(classes if n is None else min(n, classes)))

    def calibration_conditions(self) -> list[int]:
        from tinyprune.model.calibration import default_classes

        return [c for c in default_classes() for _ in range(4)]

    def image_condition(self, class_dir: str | None, caption: str | None) -> int:
        """A sub-folder named by a class index labels its images; any other image is unconditional."""
        return int(class_dir) if class_dir is not None and class_dir.isdigit() else self.embedder.null_class

    def condition(self, conditions: list[int], size: int | None = None) -> Cond:
        return {"encoder_hidden_states": self.embedder(torch.as_tensor(conditions, dtype=torch.long))}

    def null_condition(self, batch: int, size: int | None = None) -> Cond:
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
        latent_ch = pipe.latent_channels
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        unet = ComponentIO(
            "unet", "unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",), 1e-3,
            lambda p: UNetModule(p.unet, ("encoder_hidden_states",)),
            lambda b, h: {"sample": (b, latent_ch, h, h), "timestep": (b,),
                          "encoder_hidden_states": (b, ctx.seq_len, ctx.embed_dim)},
            {"sample": "latent", "out_sample": "latent"}, {"timestep": (0, n_train)})
        return (unet, *self.latent_components())

    def runtime_conditioning(self) -> tuple[dict, dict[str, object]]:
        cfg = self.embedder.config
        table = self.embedder.embedding.weight.detach().float().cpu().numpy().astype(np.float32)
        arrays = {"table": table, "seq_len": np.int64(cfg.seq_len), "embed_dim": np.int64(cfg.embed_dim),
                  "null_class": np.int64(self.embedder.null_class)}
        spec = {"kind": "class", "num_classes": int(cfg.num_classes), "guidance": self.GUIDANCE}
        return spec, {"conditioning.npz": arrays}
