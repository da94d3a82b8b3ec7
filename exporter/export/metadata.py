"""Sparsity as the ONNX file holds it: recomputed from the initializers, never taken on trust.

Prunable initializers are the weight inputs of Conv, ConvTranspose, MatMul and Gemm nodes (through the
DequantizeLinear of an int8 QDQ file or the Cast of an fp16 node kept fp32: the initializer behind them). TensorRT
reads 2:4 along the reduction axis: Conv weight [K, C, R, S] -> axis 1; MatMul B [in, out] (the
transpose of torch's Linear weight) -> axis 0; Gemm B -> axis 1 when transB=1, else axis 0.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

PREFIX = "tinyprune."


WEIGHT_PASSES = ("DequantizeLinear", "Cast")  # int8 QDQ and fp16 files put these between initializer and node


def _weight_axes(graph: onnx.GraphProto) -> dict[str, int]:
    inits = {i.name for i in graph.initializer}
    through = {o: n.input[0] for n in graph.node if n.op_type in WEIGHT_PASSES for o in n.output}
    axes = {}
    for node in graph.node:
        if len(node.input) < 2:
            continue
        weight = node.input[1]
        while weight in through and weight not in inits:
            weight = through[weight]
        if weight not in inits:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            axes[weight] = 1 if node.op_type == "Conv" else 0
        elif node.op_type == "MatMul":
            axes[weight] = 0
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[weight] = 1 if trans_b else 0
    return axes


def is_n_of_m(w: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """At least m - n zeros in every m consecutive weights along `axis`."""
    if w.ndim < 2 or w.shape[axis] % m:
        return False
    fibers = np.moveaxis(w, axis, -1)

    def holds(x: np.ndarray) -> bool:
        return bool(((x.reshape(-1, m) == 0).sum(axis=1) >= m - n).all())

    # one fiber first: unstructured zeros almost always fail it, where the whole check copies the tensor
    return holds(fibers[(0,) * (fibers.ndim - 1)]) and holds(fibers)


def tensor_figures(model: onnx.ModelProto, base_dir: str = "") -> dict[str, dict]:
    """Per prunable initializer: sparsity, pattern actually present, axis, zeros, size.

    Tensors stored as external data are read from `base_dir` one at a time, so a model loaded with
    load_external_data=False is never held whole in memory (3.4 GB for a Stable Diffusion UNet)."""
    axes = _weight_axes(model.graph)
    out = {}
    for init in model.graph.initializer:
        if init.name not in axes:
            continue
        w = numpy_helper.to_array(init, base_dir=str(base_dir))
        zeros = w.size - int(np.count_nonzero(w))
        axis = axes[init.name]
        pattern = "2:4" if zeros and is_n_of_m(w, axis) else ("unstructured" if zeros else "none")
        out[init.name] = {"sparsity": round(zeros / w.size, 6), "pattern": pattern, "axis": axis,
                          "zeros": zeros, "numel": int(w.size), "shape": list(w.shape)}
    return out


def weights_precision(model: onnx.ModelProto) -> str:
    """The precision the prunable weights are stored in: int8 where any is (QDQ), else fp16 where any is, else fp32
    (an fp16 file's nodes kept fp32 keep fp32 weights beside the fp16 ones)."""
    axes = _weight_axes(model.graph)
    types = {i.data_type for i in model.graph.initializer if i.name in axes}
    if types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
        return "int8"
    return "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"


def global_sparsity(figures: dict[str, dict]) -> float:
    total = sum(f["numel"] for f in figures.values())
    return round(sum(f["zeros"] for f in figures.values()) / total, 6) if total else 0.0


def sparsity_metadata(model: onnx.ModelProto, *, version: str, component: str, method: str, pattern: str,
                      profile: str, source_sha256: str, base_dir: str = "",
                      params_dense: int | None = None, precision: str = "fp32") -> dict[str, str]:
    """params_dense (channel pruning): the dense model's prunable parameters; the file then also claims
    tinyprune.params (its own prunable initializer elements, recomputable) and tinyprune.params_removed
    (1 - params / params_dense). Removed channels leave no zeros, so tinyprune.sparsity stays 0 there."""
    figures = tensor_figures(model, base_dir)
    tensors = {name: {"sparsity": f["sparsity"], "pattern": f["pattern"], "axis": f["axis"]}
               for name, f in figures.items() if f["zeros"]}
    extra = {}
    if params_dense:
        params = sum(f["numel"] for f in figures.values())
        extra = {PREFIX + "params_dense": str(int(params_dense)), PREFIX + "params": str(params),
                 PREFIX + "params_removed": f"{1 - params / params_dense:.6f}"}
    return extra | {
        PREFIX + "version": version,
        PREFIX + "component": component,
        PREFIX + "method": method,
        PREFIX + "pattern": pattern,
        PREFIX + "sparsity": f"{global_sparsity(figures):.6f}",
        PREFIX + "tensors": json.dumps(tensors, sort_keys=True, separators=(",", ":")),
        PREFIX + "profile": profile,
        PREFIX + "source_sha256": source_sha256,
        PREFIX + "precision": precision,
    }


STAMPED = ("version", "component", "method", "pattern", "profile", "source_sha256")


def restamp(model: onnx.ModelProto, precision: str, base_dir: str = "") -> dict[str, str]:
    """Recompute a stamped file's figures after its weights were rewritten (fp16, int8: new initializers), keeping
    what it claims about its origin; returns the new metadata."""
    old = read_metadata(model)
    dense = old.get(PREFIX + "params_dense")
    meta = sparsity_metadata(model, **{k: old[PREFIX + k] for k in STAMPED}, base_dir=base_dir,
                             params_dense=int(dense) if dense else None, precision=precision)
    set_metadata(model, meta)
    return meta


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key in sorted(meta):
        model.metadata_props.add(key=key, value=meta[key])


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def check_claims(model: onnx.ModelProto, base_dir: str = "") -> list[str]:
    """Every metadata claim recomputed from the weights; returns what does not hold."""
    meta = read_metadata(model)
    figures = tensor_figures(model, base_dir)
    problems = []
    if PREFIX + "sparsity" not in meta:
        return ["no tinyprune.sparsity metadata"]
    claimed = float(meta[PREFIX + "sparsity"])
    actual = global_sparsity(figures)
    if abs(claimed - actual) > 1e-6:
        problems.append(f"tinyprune.sparsity claims {claimed:.6f}, weights hold {actual:.6f}")
    try:
        tensors = json.loads(meta.get(PREFIX + "tensors", "{}"))
    except json.JSONDecodeError:
        return problems + ["tinyprune.tensors is not valid JSON"]
    for name, claim in tensors.items():
        f = figures.get(name)
        if f is None:
            problems.append(f"tinyprune.tensors names {name}, which is not a prunable initializer")
            continue
        if abs(claim["sparsity"] - f["sparsity"]) > 1e-6:
            problems.append(f"{name}: claims sparsity {claim['sparsity']}, holds {f['sparsity']}")
        if claim.get("axis") != f["axis"]:
            problems.append(f"{name}: claims axis {claim.get('axis')}, TensorRT's axis is {f['axis']}")
        if claim.get("pattern") == "2:4" and f["pattern"] != "2:4":
            problems.append(f"{name}: claims 2:4 but is not 2:4 along axis {f['axis']}")
    undeclared = [n for n, f in figures.items() if f["zeros"] and n not in tensors]
    if undeclared:
        problems.append(f"{len(undeclared)} sparse tensors missing from tinyprune.tensors, e.g. {undeclared[0]}")
    if PREFIX + "params" in meta:  # channel pruning: the parameter count the file claims, recomputed
        params = sum(f["numel"] for f in figures.values())
        try:
            claimed_params, dense = int(meta[PREFIX + "params"]), int(meta.get(PREFIX + "params_dense", "0"))
            removed = float(meta.get(PREFIX + "params_removed", "nan"))
        except ValueError:
            return problems + ["tinyprune.params / params_dense / params_removed are not numbers"]
        if claimed_params != params:
            problems.append(f"tinyprune.params claims {claimed_params}, the file holds {params} prunable weights")
        if dense <= 0 or abs(removed - (1 - params / dense)) > 1e-6:
            problems.append(f"tinyprune.params_removed claims {removed}, 1 - params/params_dense is "
                            f"{(1 - params / dense) if dense > 0 else float('nan'):.6f}")
    precision = meta.get(PREFIX + "precision")  # files of tinyprune before precisions claim none
    if precision is not None and precision != weights_precision(model):
        problems.append(f"tinyprune.precision claims {precision}, the weights are {weights_precision(model)}")
    pattern = meta.get(PREFIX + "pattern")
    if pattern == "2:4" and not any(f["pattern"] == "2:4" for f in figures.values()):
        problems.append("tinyprune.pattern is 2:4 but no tensor is 2:4")
    return problems
