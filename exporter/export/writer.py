"""torch -> ONNX for one component: TorchScript exporter, metadata, checker, external data past 2 GB.

dynamo=False on purpose: on a tiny UNet it exported in 0.66 s against 6.9 s for dynamo=True with
the same drift (measured with torch 2.13), and its opset choice is explicit, which old TensorRT
parsers (opset 13 on JetPack 4.6; ../shared/DESIGN.md lists each JetPack's) need.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from tinyprune.export.specs import ComponentSpec
from tinyprune.config import ExportSpec
from tinyprune.errors import InputError
from tinyprune.export.metadata import set_metadata, sparsity_metadata
from tinyprune.model.pipeline import Pipeline

# Highest opset the TorchScript exporter is exercised with here; profiles cap it further.
MAX_EXPORT_OPSET = 17


@contextmanager
def plain_attention(pipe: Pipeline):
    """Plain MatMul/Softmax attention while tracing: exports at any opset and every TensorRT version parses it.
    CLIP's fused attention (scaled_dot_product_attention) needs opset 14, which JetPack 4.6's TensorRT 8.2 does
    not parse; its eager attention exports at 13. Only for the trace: PyTorch sampling after the export keeps
    the fused attention, which at Stable Diffusion size (4096 tokens) does not materialise 8 x 4096 x 4096
    attention matrices (> 1 GB)."""
    from diffusers.models.attention_processor import AttnProcessor

    diffusers_models = [m for m in (pipe.unet, pipe.vae) if hasattr(m, "set_attn_processor")]
    saved = {m: m.attn_processors for m in diffusers_models}
    text = {m: m.config._attn_implementation for m in pipe.models().values() if hasattr(m, "set_attn_implementation")}
    for m in diffusers_models:
        m.set_attn_processor(AttnProcessor())
    for m in text:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m, processors in saved.items():
            m.set_attn_processor(processors)
        for m, impl in text.items():
            m.set_attn_implementation(impl)


def export_component(pipe: Pipeline, comp: ComponentSpec, spec: ExportSpec, path: Path, meta: dict) -> dict:
    """Export one component to `path` (a model.onnx inside its own dir); returns the metadata stamped on it."""
    with plain_attention(pipe):
        _trace(pipe, comp, spec, path)
    model = onnx.load(str(path), load_external_data=False)  # past 2 GB torch wrote one file per tensor
    model.producer_name, model.producer_version = "tinyprune", meta["version"]
    stamped = sparsity_metadata(model, component=comp.name, **meta, base_dir=str(path.parent))
    set_metadata(model, stamped)
    external = _data_size(model, path.parent) > spec.external_data_threshold
    _write_model(model, path, external)
    onnx.checker.check_model(str(path))
    return stamped


def _trace(pipe: Pipeline, comp: ComponentSpec, spec: ExportSpec, path: Path) -> None:
    module = comp.module(pipe).eval()
    feed = comp.dummy_feed(spec.batch.opt, spec.work_latent)
    args = tuple(torch.from_numpy(feed[n]) for n in comp.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(path), input_names=list(comp.inputs), output_names=list(comp.outputs),
                dynamic_axes=comp.dynamic_axes(spec), opset_version=spec.opset, do_constant_folding=True,
                dynamo=False,
            )
    except torch.onnx.errors.UnsupportedOperatorError as e:
        raise InputError(f"{comp.name} cannot be exported at opset {spec.opset}: {str(e).splitlines()[0][:200]}") from None


# Tensors at least this big go to the .data file (onnx's own default size_threshold) at offsets aligned
# to ALIGN, so that onnxruntime can memory-map them.
SIZE_THRESHOLD = 1024
ALIGN = 4096


def _data_size(model: onnx.ModelProto, base_dir: Path) -> int:
    size = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            size += int(info.get("length") or (base_dir / info["location"]).stat().st_size)
        else:
            size += len(init.raw_data)
    return size


def _write_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `model` to `path`, tensors inline or in one `model.onnx_data` file beside it, streaming one tensor at a time.

    torch.onnx.export (TorchScript) writes a file per tensor beside the model past 2 GB; onnx.load +
    onnx.save_model would then hold every tensor in memory at once, beside the PyTorch weights. Here each
    tensor is read from wherever the exporter put it, appended to the data file (or inlined), and the
    exporter's own files are removed afterwards. The result is deterministic: tensors in graph order.
    """
    root = path.parent
    data_name = path.name + "_data"  # model.onnx_data: optimum's and diffusers' name
    leftovers = {p for p in root.iterdir() if p != path}
    out = open(root / (data_name + ".partial"), "wb") if external else None
    try:
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                raw = external_data_helper._read_external_data_bytes(init, str(root))
            elif init.HasField("raw_data"):
                raw = None
            else:  # typed fields (float_data, ...): small constants; leave them as they are
                continue
            if external and len(raw if raw is not None else init.raw_data) >= SIZE_THRESHOLD:
                data = raw if raw is not None else init.raw_data
                out.write(b"\0" * (-out.tell() % ALIGN))
                offset = out.tell()
                out.write(data)
                init.ClearField("raw_data")
                del init.external_data[:]
                init.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                    init.external_data.add(key=key, value=value)
            elif raw is not None:
                init.raw_data = raw
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
            del raw
    finally:
        if out is not None:
            out.close()
    for leftover in leftovers:  # the exporter's per-tensor files, or a stale .data of an earlier run
        leftover.unlink()
    if external:
        os.replace(root / (data_name + ".partial"), root / data_name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def load_onnx(path: str | Path, load_data: bool = True) -> onnx.ModelProto:
    """Load with external data, refusing data locations that escape the model's directory.

    load_data=False checks the locations but leaves the tensors on disk: pass the model's directory as
    base_dir to export/metadata.py's functions, which then read them one at a time."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{path} is not a valid ONNX file ({type(e).__name__})") from None
    if not model.HasField("graph") or not model.ir_version:  # an empty or unrelated file can parse as protobuf
        raise InputError(f"{path} is not a valid ONNX file (no graph or IR version)")
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
    if load_data:
        onnx.load_external_data_for_model(model, str(root))
    return model
