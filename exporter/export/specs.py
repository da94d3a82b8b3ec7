"""Per-component export specs, built from the pipeline's own config through its family adapter (as optimum builds
its OnnxConfig from the model config): wrapper module, input/output names, shapes, dynamic axes, tolerances.

Shapes are written in terms of batch b and latent size h (pixels = h * vae_scale), so one function
gives both the dummy inputs for export and the min/opt/max shapes TensorRT profiles need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinyprune.config import DeviceProfile, ExportSpec, work_latent
from tinyprune.errors import InputError
from tinyprune.model.families import ComponentIO
from tinyprune.model.pipeline import Pipeline

# Dynamic spatial axis names: latents and images get their own, so a component with both (the VAE) does not
# declare them equal.
SPATIAL_AXES = {"latent": ("latent_height", "latent_width"), "image": ("height", "width")}


@dataclass(frozen=True)
class ComponentSpec:
    """A family's ComponentIO plus what export and validation need: tolerance per profile, dummy feeds, TensorRT
    shape profiles and dynamic axes."""

    io: ComponentIO

    @property
    def name(self) -> str:
        return self.io.name

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.io.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.io.outputs

    @property
    def source(self) -> str:
        return self.io.source

    def module(self, pipe: Pipeline) -> torch.nn.Module:
        """The wrapper module over `pipe`'s weights (dense or pruned pipelines share a spec)."""
        return self.io.module(pipe)

    def shape(self, batch: int, latent: int) -> dict[str, tuple[int, ...]]:
        return self.io.shape(batch, latent)

    def tolerance(self, profile: DeviceProfile) -> float:
        return profile.tolerance.get(self.name, self.io.default_tolerance)

    def dummy_feed(self, batch: int, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
        return self.io.dummy_feed(batch, latent, seed)

    def trt_shapes(self, spec: ExportSpec) -> dict[str, dict[str, list[int]]]:
        at = {k: self.shape(getattr(spec.batch, k), getattr(spec.latent, k)) for k in ("min", "opt", "max")}
        return {name: {k: list(at[k][name]) for k in at} for name in self.inputs}

    def dynamic_axes(self, spec: ExportSpec) -> dict[str, dict[int, str]]:
        spatial = spec.spatial_dynamic
        axes = {}
        for name in self.inputs + self.outputs:
            axes[name] = {0: "batch"}
            if spatial and name in self.io.spatial:
                h, w = SPATIAL_AXES[self.io.spatial[name]]
                axes[name].update({2: h, 3: w})
        return axes


def component_specs(pipe: Pipeline) -> tuple[ComponentSpec, ...]:
    """Every ONNX component of the pipeline, in export order."""
    return tuple(ComponentSpec(io) for io in pipe.family.components())


def component_spec(pipe: Pipeline, name: str) -> ComponentSpec:
    specs = {s.name: s for s in component_specs(pipe)}
    if name not in specs:
        raise InputError(f"this pipeline has no {name} component; it has {', '.join(specs)}")
    return specs[name]


def component_config(pipe: Pipeline, source: str) -> dict:
    """config.json of an ONNX component's dir: the config of the model that holds its weights (what optimum's ORT
    pipelines read beside model.onnx), as diffusers or transformers serialise it, without `_name_or_path`: the
    directory it was loaded from, a path of this machine (and of the bundle's staging dir)."""
    import json

    model = pipe.models()[source]
    config = getattr(model, "to_json_string", None) or model.config.to_json_string  # diffusers | transformers
    return {k: v for k, v in json.loads(config()).items() if k != "_name_or_path"}


def export_spec(pipe: Pipeline, profile: DeviceProfile, max_opset: int) -> ExportSpec:
    """Shapes from the profile; the opset is the highest within the profile's max_opset and `max_opset` that the
    target's TensorRT parser takes the exported ops at (export/trt_parser.py: 16 for TensorRT 8.5, whose parser has
    no LayerNormalization, which torch emits from 17 on)."""
    from tinyprune.config import Range
    from tinyprune.export.trt_parser import parser_opset

    native = pipe.latent_size
    latent = profile.latent or Range(native, native, native)
    work = work_latent(pipe.unet_params, latent.opt)
    return ExportSpec(opset=parser_opset(profile, max_opset).opset, batch=profile.batch, latent=latent, work=work)
