"""Family adapters: one per pipeline family, the only code that knows how a family conditions, calls its UNet,
encodes and decodes, and which ONNX components it has. Everything outside model/ asks `pipe.family`."""

from __future__ import annotations

from tinyprune.errors import InputError
from tinyprune.model.families.base import (ComponentIO, Cond, Family, cat_cond, flat_cond, move_cond, repeat_cond,
                                           take_cond)
from tinyprune.model.families.text import LatentConsistencyFamily, StableDiffusionFamily, StableDiffusionXLFamily
from tinyprune.model.families.unconditional import DDPMFamily, LDMFamily

FAMILIES: tuple[type[Family], ...] = (StableDiffusionFamily, StableDiffusionXLFamily, LatentConsistencyFamily,
                                      DDPMFamily, LDMFamily)


def family_for(index: dict, where: str) -> type[Family]:
    """The adapter class of a pipeline's model_index.json; one line naming the supported ones otherwise."""
    for family in FAMILIES:
        if family.accepts(index):
            return family
    cls = index.get("_class_name", "unknown")
    parts = ", ".join(f"{k} {v[1]}" for k, v in sorted(index.items())
                      if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1])
    supported = "; ".join(f.describe() for f in FAMILIES)
    raise InputError(f"{where}: pipeline {cls} ({parts}) is not supported; supported: {supported}")


__all__ = ["FAMILIES", "ComponentIO", "Cond", "Family", "cat_cond", "family_for", "flat_cond", "move_cond", "repeat_cond",
           "take_cond"]
