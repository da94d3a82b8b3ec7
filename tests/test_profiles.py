"""Shipped device profiles: they load, they say what the sources in their comments say, and bad profiles are refused."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from tinyprune.config import DeviceProfile, load_profile, parse_profile, profile_names
from tinyprune.errors import InputError
from tinyprune.export.trt_parser import parser_row

# name -> (compute_capability, sparse_tensor_cores, jetpack, trt_version, max_opset, dla_cores, precisions)
# Each value is documented, with its source, in the comments of profiles/<name>.toml.
EXPECTED = {
    "jetson-orin-nano": ("8.7", True, "6.2", "10.3", 20, 0, ("fp32", "fp16", "int8")),
    "jetson-orin-nx": ("8.7", True, "6.2", "10.3", 20, 2, ("fp32", "fp16", "int8")),
    "jetson-agx-orin": ("8.7", True, "6.2", "10.3", 20, 2, ("fp32", "fp16", "int8")),
    "jetson-xavier-nx": ("7.2", False, "5.1.2", "8.5.2", 17, 2, ("fp32", "fp16", "int8")),
    "jetson-agx-xavier": ("7.2", False, "5.1.2", "8.5.2", 17, 2, ("fp32", "fp16", "int8")),
    "jetson-nano": ("5.3", False, "4.6.1", "8.2.1", 13, 0, ("fp32", "fp16")),
    "x86-ampere-gpu": ("8.6", True, "", "10.0", 20, 0, ("fp32", "fp16", "int8")),
    "x86-cpu": ("", False, "", "", 17, 0, ("fp32", "int8")),
    "arm64-cpu": ("", False, "", "", 17, 0, ("fp32", "int8")),
}
CPU_TARGETS = ("x86-cpu", "arm64-cpu")

# Highest opset each TensorRT ONNX parser documents (onnx-tensorrt docs/operators.md on the release branch).
TRT_MAX_OPSET = {"8.2": 13, "8.5": 17, "10.0": 20, "10.3": 20}


def _all() -> list[DeviceProfile]:
    return [load_profile(n) for n in EXPECTED]


def _shipped_text(name: str) -> str:
    return resources.files("tinyprune.profiles").joinpath(f"{name}.toml").read_text()


def test_exactly_the_expected_profiles_ship():
    assert profile_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_loads_by_name_with_documented_facts(name):
    p = load_profile(name)
    cc, sparse, jetpack, trt, opset, dla, precisions = EXPECTED[name]
    assert p.name == name
    assert p.source == f"profiles/{name}.toml"
    assert (p.compute_capability, p.sparse_tensor_cores, p.jetpack, p.trt_version) == (cc, sparse, jetpack, trt)
    assert (p.max_opset, p.dla_cores, p.precisions) == (opset, dla, precisions)
    assert p.is_jetson == name.startswith("jetson-")
    assert p.has_tensorrt == (name not in CPU_TARGETS)


def test_jetson_alias_resolves_to_orin_nano_and_is_the_only_alias():
    assert load_profile("jetson").name == "jetson-orin-nano"
    assert load_profile("jetson") == load_profile("jetson-orin-nano")
    aliases = {p.name: p.aliases for p in _all()}
    assert aliases.pop("jetson-orin-nano") == ("jetson",)
    assert all(a == () for a in aliases.values())


def test_sparse_tensor_cores_iff_compute_capability_at_least_8():
    for p in _all():
        has_cc8 = bool(p.compute_capability) and float(p.compute_capability) >= 8.0
        assert p.sparse_tensor_cores == has_cc8, p.name
    assert sum(p.sparse_tensor_cores for p in _all()) == 4  # three Orins + desktop Ampere


def test_max_opset_within_what_the_targets_tensorrt_parses():
    for p in _all():
        if not p.has_tensorrt:
            continue
        major_minor = ".".join(p.trt_version.split(".")[:2])
        assert p.max_opset <= TRT_MAX_OPSET[major_minor], p.name
        assert parser_row(p.trt_version).max_opset == TRT_MAX_OPSET[major_minor], p.name  # export/trt_parser.py agrees
    nano = load_profile("jetson-nano")
    assert nano.trt_version.startswith("8.2.") and nano.max_opset == 13  # "TensorRT 8.2 ... up to Opset 13"
    for name in ("jetson-xavier-nx", "jetson-agx-xavier"):
        assert load_profile(name).max_opset == 17  # "TensorRT 8.5 supports operators up to Opset 17"


def test_nano_has_no_int8_and_no_dla():
    nano = load_profile("jetson-nano")
    assert "int8" not in nano.precisions and nano.dla_cores == 0


def test_cpu_targets_have_no_gpu_facts():
    for name in CPU_TARGETS:
        p = load_profile(name)
        assert (p.compute_capability, p.trt_version, p.jetpack) == ("", "", "")
        assert (p.sparse_tensor_cores, p.dla_cores, p.workspace_mb, p.precisions) == (False, 0, 0, ("fp32", "int8"))


def test_budgets_shapes_tolerances_and_gates():
    for p in _all():
        assert p.memory_budget_mb > 0
        if p.has_tensorrt:
            assert 0 < p.workspace_mb <= p.memory_budget_mb // 2, p.name
        assert p.batch.opt == 2 and p.batch.min == 1 and p.batch.max in (2, 4, 8), p.name  # CFG: cond + uncond
        assert p.latent is None  # "native"
        assert p.tolerance == {"unet": 1e-3, "vae_encoder": 1e-3, "vae_decoder": 5e-3, "text_encoder": 1e-3}
        assert (p.min_image_psnr_db, p.max_fd_ratio, p.min_accuracy) == (14.0, 1.25, 0.85)
        assert set(p.latency_budget_ms) == {"unet", "generation"}
        assert p.latency_budget_ms["generation"] == pytest.approx(25 * p.latency_budget_ms["unet"])
    assert load_profile("jetson-nano").latency_budget_ms["unet"] == 50.0
    assert load_profile("x86-cpu").latency_budget_ms["unet"] == 200.0


def test_every_shipped_file_cites_sources():
    for name in EXPECTED:
        text = _shipped_text(name)
        comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
        assert any("https://" in c for c in comments), name


def test_cpu_max_opset_runs_on_installed_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper

    for name in CPU_TARGETS:
        opset = load_profile(name).max_opset
        # LayerNormalization exists from opset 17: the model uses an op of the profile's own opset.
        node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)
        graph = helper.make_graph(
            [node], "ln",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
            initializer=[
                helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4),
                helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.0] * 4),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.array([[1, 2, 3, 4], [0, 0, 0, 8]], dtype=np.float32)
        (y,) = sess.run(None, {"x": x})
        ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        assert np.abs(y - ref).max() < 1e-5


def test_wrong_type_names_file_and_field():
    text = re.sub(r"(?m)^max_opset = \d+$", 'max_opset = "seventeen"', _shipped_text("x86-cpu"))
    assert 'max_opset = "seventeen"' in text
    with pytest.raises(InputError) as err:
        parse_profile(text, "my-board.toml")
    msg = str(err.value)
    assert msg.startswith("my-board.toml:")
    assert "'max_opset'" in msg and "int" in msg and "'seventeen'" in msg


def test_wrong_type_in_file_by_path_names_the_path(tmp_path):
    path = tmp_path / "my-board.toml"
    path.write_text(re.sub(r"(?m)^dla_cores = \d+$", "dla_cores = 2.5", _shipped_text("jetson-agx-orin")))
    with pytest.raises(InputError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and "'dla_cores'" in str(err.value)


def test_sparse_claim_at_cc_7_2_is_refused():
    text = _shipped_text("jetson-agx-xavier").replace("sparse_tensor_cores = false", "sparse_tensor_cores = true")
    assert "sparse_tensor_cores = true" in text
    with pytest.raises(InputError) as err:
        parse_profile(text, "xavier-sparse.toml")
    msg = str(err.value)
    assert "xavier-sparse.toml" in msg and "sparse_tensor_cores" in msg and "7.2" in msg


def test_unknown_target_lists_known_names():
    with pytest.raises(InputError) as err:
        load_profile("jetson-thor")
    msg = str(err.value)
    assert "unknown target 'jetson-thor'" in msg
    for name in list(EXPECTED) + ["jetson"]:
        assert name in msg


def test_missing_profile_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))
