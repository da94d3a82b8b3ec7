"""verify's metadata recomputation, each claim kind driven just past what the weights hold (and just inside it).

A two-node ONNX model (a Conv and a MatMul weight, one of them 2:4 along TensorRT's axis) stamped by
sparsity_metadata, then one claim at a time edited: check_claims must name that claim and nothing else, and pass
the edit that stays within its rounding tolerance (1e-6 on fractions)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tinyprune.export.metadata import PREFIX, check_claims, read_metadata, set_metadata, sparsity_metadata


def _model(params_dense: int | None = None, two_four: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    conv[:, 0::4] = 0
    if two_four:
        conv[:, 1::4] = 0  # 2:4 along the input channels (axis 1)
    mm = rng.standard_normal((8, 4)).astype(np.float32)
    mm[0, :3] = 0  # 3 zeros, not 2:4 along axis 0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("MatMul", ["f", "mm_w"], ["y"])], "g", [x], [y],
        [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(mm, "mm_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, sparsity_metadata(model, version="t", component="unet", method="magnitude", pattern="2:4",
                                          profile="p", source_sha256="0", params_dense=params_dense))
    return model


def _edit(model: onnx.ModelProto, **changes: str) -> onnx.ModelProto:
    meta = {k: v for k, v in read_metadata(model).items() if k.startswith(PREFIX)}
    set_metadata(model, meta | {PREFIX + k: v for k, v in changes.items()})
    return model


def _tensors(model: onnx.ModelProto) -> dict:
    return json.loads(read_metadata(model)[PREFIX + "tensors"])


def test_the_honest_file_passes():
    model = _model(params_dense=100)
    meta = read_metadata(model)
    assert meta[PREFIX + "sparsity"] == f"{(32 + 3) / 96:.6f}" and meta[PREFIX + "params"] == "96"
    assert check_claims(model) == []


@pytest.mark.parametrize("delta, fails", [(2e-6, True), (-2e-6, True), (5e-7, False)])
def test_global_sparsity_claim(delta, fails):
    model = _model()
    actual = float(read_metadata(model)[PREFIX + "sparsity"])
    problems = check_claims(_edit(model, sparsity=f"{actual + delta:.7f}"))
    assert problems == ([f"tinyprune.sparsity claims {actual + delta:.6f}, weights hold {actual:.6f}"] if fails else [])


@pytest.mark.parametrize("delta, fails", [(2e-6, True), (5e-7, False)])
def test_per_tensor_sparsity_claim(delta, fails):
    model = _model()
    tensors = _tensors(model)
    held = tensors["mm_w"]["sparsity"]
    tensors["mm_w"]["sparsity"] = held + delta
    problems = check_claims(_edit(model, tensors=json.dumps(tensors)))
    assert problems == ([f"mm_w: claims sparsity {held + delta}, holds {held}"] if fails else [])


def test_axis_claim():
    model = _model()
    tensors = _tensors(model)
    tensors["conv_w"]["axis"] = 0
    assert check_claims(_edit(model, tensors=json.dumps(tensors))) == ["conv_w: claims axis 0, TensorRT's axis is 1"]


def test_two_four_claim_on_a_tensor_that_is_not():
    model = _model()
    tensors = _tensors(model)
    assert tensors["conv_w"]["pattern"] == "2:4" and tensors["mm_w"]["pattern"] == "unstructured"
    tensors["mm_w"]["pattern"] = "2:4"
    assert check_claims(_edit(model, tensors=json.dumps(tensors))) == ["mm_w: claims 2:4 but is not 2:4 along axis 0"]


def test_file_pattern_two_four_needs_a_two_four_tensor():
    model = _model(two_four=False)  # every per-tensor claim honest, the file's pattern not
    assert all(t["pattern"] == "unstructured" for t in _tensors(model).values())
    assert check_claims(model) == ["tinyprune.pattern is 2:4 but no tensor is 2:4"]


def test_a_sparse_tensor_left_out_of_the_claims():
    model = _model()
    tensors = _tensors(model)
    del tensors["mm_w"]
    assert check_claims(_edit(model, tensors=json.dumps(tensors))) == [
        "1 sparse tensors missing from tinyprune.tensors, e.g. mm_w"]


def test_a_claim_naming_no_prunable_initializer():
    model = _model()
    tensors = _tensors(model) | {"ghost": {"sparsity": 0.5, "pattern": "unstructured", "axis": 0}}
    assert check_claims(_edit(model, tensors=json.dumps(tensors))) == [
        "tinyprune.tensors names ghost, which is not a prunable initializer"]


@pytest.mark.parametrize("params, fails", [("95", True), ("97", True), ("96", False)])
def test_channel_params_claim(params, fails):
    problems = check_claims(_edit(_model(params_dense=100), params=params))
    assert problems == ([f"tinyprune.params claims {params}, the file holds 96 prunable weights"] if fails else [])


@pytest.mark.parametrize("removed, fails", [("0.040002", True), ("0.039998", True), ("0.0400005", False)])
def test_channel_params_removed_claim(removed, fails):
    problems = check_claims(_edit(_model(params_dense=100), params_removed=removed))
    assert problems == ([f"tinyprune.params_removed claims {float(removed)}, 1 - params/params_dense is 0.040000"]
                        if fails else [])


def test_unreadable_claims_are_problems_not_crashes():
    assert check_claims(_edit(_model(), tensors="{not json")) == ["tinyprune.tensors is not valid JSON"]
    assert check_claims(_edit(_model(params_dense=100), params="many")) == [
        "tinyprune.params / params_dense / params_removed are not numbers"]
    bare = _model()
    set_metadata(bare, {})
    assert check_claims(bare) == ["no tinyprune.sparsity metadata"]


# ------------------------------------------------------------------ the figures the claims are checked against
def test_is_n_of_m_reads_groups_along_the_given_axis():
    from tinyprune.export.metadata import is_n_of_m

    w = np.ones((4, 8, 3, 3), np.float32)
    w[:, 0::4] = w[:, 1::4] = 0  # 2:4 along input channels of a 3x3 Conv weight
    assert is_n_of_m(w, 1) and not is_n_of_m(w, 0)
    assert is_n_of_m(np.moveaxis(w, 1, 0).copy(), 0)
    m = np.ones((8, 6), np.float32)
    m[0::4] = m[1::4] = 0
    assert is_n_of_m(m, 0) and not is_n_of_m(m, 1)  # 6 columns is not a multiple of 4
    assert not is_n_of_m(np.array([0, 0, 1, 1], np.float32), 0)  # 1-D: never a 2:4 weight
    assert is_n_of_m(np.zeros((4, 4)), 1, n=1, m=4) and not is_n_of_m(m, 0, n=1, m=4)


def _init(name, w):
    return numpy_helper.from_array(np.asarray(w, np.float32), name)


def test_weight_axes_per_operator():
    from tinyprune.export.metadata import tensor_figures

    w = np.ones((4, 4, 1, 1), np.float32)
    w[0, 0] = 0
    nodes = [helper.make_node("Conv", ["x", "conv"], ["a"]), helper.make_node("ConvTranspose", ["a", "deconv"], ["b"]),
             helper.make_node("Gemm", ["f", "gemm_t"], ["c"], transB=1), helper.make_node("Gemm", ["f", "gemm"], ["d"]),
             helper.make_node("MatMul", ["f", "mm"], ["e"]), helper.make_node("Add", ["f", "bias"], ["g"]),
             helper.make_node("MatMul", ["f", "x"], ["h"]), helper.make_node("Relu", ["f"], ["i"])]
    inits = [_init("bias", np.zeros(4)), _init("conv", w), _init("deconv", w), _init("gemm_t", w[:, :, 0, 0]),
             _init("gemm", w[:, :, 0, 0]), _init("mm", np.ones((4, 4)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("i", TensorProto.FLOAT, None)], inits)
    figures = tensor_figures(helper.make_model(graph))
    assert {n: f["axis"] for n, f in figures.items()} == {"conv": 1, "deconv": 0, "gemm_t": 1, "gemm": 0, "mm": 0}
    assert figures["conv"] == {"sparsity": round(1 / 16, 6), "pattern": "unstructured", "axis": 1, "zeros": 1,
                               "numel": 16, "shape": [4, 4, 1, 1]}
    assert figures["mm"]["pattern"] == "none" and figures["mm"]["sparsity"] == 0.0
    third = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", [[0.0], [1], [2]])])
    assert tensor_figures(helper.make_model(third))["w"]["sparsity"] == 0.333333  # six places, as the claims


def test_figures_round_to_six_places_and_read_external_data(tmp_path):
    from tinyprune.export.metadata import global_sparsity, tensor_figures

    model = _model()
    conv = next(i for i in model.graph.initializer if i.name == "conv_w")
    w = np.ones((8, 8, 1, 1), np.float32)
    w.flat[:21] = 0  # 21 / 64 = 0.328125 exactly; with the MatMul's 3 of 32: 24 / 96 = 0.25
    conv.CopyFrom(_init("conv_w", w))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx_data", size_threshold=0)
    bare = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    figures = tensor_figures(bare, str(tmp_path))
    assert figures["conv_w"]["sparsity"] == 0.328125 and global_sparsity(figures) == 0.25
    assert global_sparsity({"a": {"zeros": 1, "numel": 3}}) == 0.333333 and global_sparsity({}) == 0.0
    set_metadata(bare, sparsity_metadata(bare, version="t", component="unet", method="m", pattern="unstructured",
                                         profile="p", source_sha256="0", base_dir=str(tmp_path)))
    assert check_claims(bare, str(tmp_path)) == []


def test_sparsity_metadata_states_every_field():
    meta = read_metadata(_model(params_dense=120))
    tensors = json.loads(meta[PREFIX + "tensors"])
    assert meta[PREFIX + "tensors"] == json.dumps(tensors, sort_keys=True, separators=(",", ":"))
    assert tensors == {"conv_w": {"sparsity": 0.5, "pattern": "2:4", "axis": 1},
                       "mm_w": {"sparsity": round(3 / 32, 6), "pattern": "unstructured", "axis": 0}}
    assert {k: meta[PREFIX + k] for k in ("version", "component", "method", "pattern", "profile", "source_sha256",
                                          "params_dense", "params", "params_removed")} == {
        "version": "t", "component": "unet", "method": "magnitude", "pattern": "2:4", "profile": "p",
        "source_sha256": "0", "params_dense": "120", "params": "96", "params_removed": "0.200000"}
    assert PREFIX + "params" not in read_metadata(_model())


def test_claims_default_when_a_file_states_less():
    model = _model(two_four=False)
    meta = {k: v for k, v in read_metadata(model).items() if k.startswith(PREFIX)}
    set_metadata(model, {k: v for k, v in meta.items() if k not in (PREFIX + "tensors", PREFIX + "pattern")})
    assert check_claims(model) == ["2 sparse tensors missing from tinyprune.tensors, e.g. conv_w"]
    dense = _model()
    for init in dense.graph.initializer:
        init.CopyFrom(_init(init.name, np.ones(numpy_helper.to_array(init).shape)))
    set_metadata(dense, {PREFIX + "sparsity": "0.000000"})  # no tensors claim, nothing sparse: nothing to check
    assert check_claims(dense) == []


def test_every_problem_is_listed_not_only_the_first():
    model = _model()
    tensors = {"ghost": {"sparsity": 0.5, "pattern": "unstructured", "axis": 0}} | _tensors(model)
    tensors["mm_w"]["axis"] = 1
    assert check_claims(_edit(model, tensors=json.dumps(tensors))) == [
        "tinyprune.tensors names ghost, which is not a prunable initializer",
        "mm_w: claims axis 1, TensorRT's axis is 0"]


def test_channel_claims_with_missing_or_odd_dense_counts():
    base = {k: v for k, v in read_metadata(_model(params_dense=100)).items() if k.startswith(PREFIX)}
    model = _model(params_dense=100)
    set_metadata(model, {k: v for k, v in base.items() if k != PREFIX + "params_removed"})
    assert check_claims(model) == []  # no params_removed claim: nothing to recompute
    set_metadata(model, {k: v for k, v in base.items() if k != PREFIX + "params_dense"})
    assert check_claims(model) == ["tinyprune.params_removed claims 0.04, 1 - params/params_dense is nan"]
    set_metadata(model, base | {PREFIX + "params_dense": "0"})
    assert check_claims(model) == ["tinyprune.params_removed claims 0.04, 1 - params/params_dense is nan"]
    set_metadata(model, base | {PREFIX + "params_dense": "1", PREFIX + "params_removed": "-95.000000"})
    assert check_claims(model) == []  # one dense parameter is odd, not wrong
    set_metadata(model, base | {PREFIX + "params_dense": "1"})
    assert check_claims(model) == ["tinyprune.params_removed claims 0.04, 1 - params/params_dense is -95.000000"]
