"""Unconditional families: DDPMPipeline (a UNet2DModel in pixel space, no VAE) and LDMPipeline (a UNet2DModel on
a VQModel's latents), the settings of Diff-Pruning's and the L1 paper's experiments. No conditioning: the UNet is
called with sample and timestep only, sampling runs without guidance, calibration is the dense model's own
samples from noise, and a condition is only a placeholder (None) that counts images."""

from __future__ import annotations

from tinyprune.model.families.base import ComponentIO, Cond, Family, UNetModule

CALIBRATION_SAMPLES = 40


class UnconditionalFamily(Family):
    UNET = "UNet2DModel"

    @property
    def guided(self) -> bool:
        return False

    def check_conditions(self, n: int | None = None) -> list[None]:
        return [None] * (self.CHECK_CONDITIONS if n is None else n)

    def calibration_conditions(self, n: int | None = None) -> list[None]:
        return [None] * (CALIBRATION_SAMPLES if n is None else n)

    def image_condition(self, caption: str | None) -> None:
        return None

    def condition(self, conditions: list, size: int | None = None) -> Cond:
        return {}

    def null_condition(self, batch: int, size: int | None = None) -> Cond | None:
        return None

    @property
    def context_tokens(self) -> int:
        return 0

    def runtime_conditioning(self) -> tuple[dict, dict[str, str]]:
        return {"kind": "none"}, {}

    def components(self) -> tuple[ComponentIO, ...]:
        pipe = self.pipe
        latent_ch, n_train = pipe.latent_channels, int(pipe.scheduler.config.num_train_timesteps)
        unet = ComponentIO(
            "unet", "unet", ("sample", "timestep"), ("out_sample",), 1e-3, lambda p: UNetModule(p.unet),
            lambda b, h: {"sample": (b, latent_ch, h, h), "timestep": (b,)},
            {"sample": "latent", "out_sample": "latent"}, {"timestep": (0, n_train)})
        return (unet, *self.latent_components())


class DDPMFamily(UnconditionalFamily):
    name = "ddpm"
    PIPELINES = ("DDPMPipeline",)
    VAE = None
    VAE_CLASSES = ()


class LDMFamily(UnconditionalFamily):
    name = "ldm"
    PIPELINES = ("LDMPipeline",)
    VAE = "vqvae"
    VAE_CLASSES = ("VQModel",)
