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
