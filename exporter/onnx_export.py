"""torch -> ONNX for one component: TorchScript exporter, metadata, checker, external data past 2 GB.

dynamo=False on purpose: on a tiny UNet it exported in 0.66 s against 6.9 s for dynamo=True with
the same drift (torch 2.13, DESIGN.md), and its opset choice is explicit, which old TensorRT
parsers (opset 13 on JetPack 4.6) need. tests/test_export.py pins the choice.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import torch

from .components import ComponentSpec
from .config import ExportSpec
from .errors import InputError
from .onnx_sparsity import set_metadata, sparsity_metadata
from .pipeline import Pipeline

# Highest opset the TorchScript exporter is exercised with here; profiles cap it further.
MAX_EXPORT_OPSET = 17


def _use_plain_attention(pipe: Pipeline) -> None:
    """Plain MatMul/Softmax attention: exports at any opset and every TensorRT version parses it."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())


def export_component(pipe: Pipeline, comp: ComponentSpec, spec: ExportSpec, path: Path, meta: dict) -> dict:
    """Export one component to `path` (a model.onnx inside its own dir); returns the metadata stamped on it."""
    _use_plain_attention(pipe)
    module = comp.module(pipe).eval()
    feed = comp.dummy_feed(pipe, spec.batch.opt, spec.latent.opt)
    args = tuple(torch.from_numpy(feed[n]) for n in comp.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(comp.inputs), output_names=list(comp.outputs),
            dynamic_axes=comp.dynamic_axes(spec), opset_version=spec.opset, do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    model.producer_name, model.producer_version = "tinyprune", meta["version"]
    stamped = sparsity_metadata(model, component=comp.name, **meta)
    set_metadata(model, stamped)
    size = sum(len(i.raw_data) for i in model.graph.initializer)
    external = size > spec.external_data_threshold
    for leftover in path.parent.iterdir():  # the exporter's own external files, replaced below
        if leftover != path:
            leftover.unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path) if external else model)
    return stamped


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load with external data, refusing data locations that escape the model's directory."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{path} is not a valid ONNX file ({type(e).__name__})") from None
    root = path.parent.resolve()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise InputError(f"{path}: external data location '{location}' escapes the model directory; refused")
        if not target.is_file():
            raise InputError(f"{path}: external data file '{location}' is missing")
    onnx.load_external_data_for_model(model, str(root))
    return model
