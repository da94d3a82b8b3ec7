"""--precision: fp16 and int8 QDQ files from `tinyprune export`, their gates, metadata and build flags, and the
refusals (export/precision.py)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.config import load_profile, parse_profile
from tinyprune.errors import InputError
from tinyprune.export import precision as P
from tinyprune.export.metadata import check_claims, read_metadata, set_metadata, sparsity_metadata, weights_precision

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------ choosing a precision
def test_resolve_explicit_and_auto():
    cpu, gpu, nano = load_profile("x86-cpu"), load_profile("x86-ampere-gpu"), load_profile("jetson-nano")
    assert P.resolve(None, cpu, 0).precision == "fp32"
    assert P.resolve("int8", cpu, 0).precision == "int8"
    assert P.resolve("auto", gpu, 1000).precision == "fp16"
    assert P.resolve("auto", cpu, P.AUTO_INT8_MIN_PARAMS - 1).precision == "fp32"
    assert P.resolve("auto", cpu, P.AUTO_INT8_MIN_PARAMS).precision == "int8"
    assert P.resolve("auto", nano, 10**9).precision == "fp16"
    with pytest.raises(InputError, match="jetson-nano runs fp32, fp16"):
        P.resolve("int8", nano, 0)
    with pytest.raises(InputError, match="x86-cpu runs fp32, int8"):
        P.resolve("fp16", cpu, 0)
    with pytest.raises(InputError, match="unknown --precision 'int4'"):
        P.resolve("int4", cpu, 0)


PROFILE = __import__("importlib.resources").resources.files("tinyprune.profiles").joinpath("x86-cpu.toml").read_text()


def test_profile_precision_gates():
    p = parse_profile(PROFILE, "x")
    int8 = p.for_precision("int8")
    assert int8.tolerance["unet"] == p.precision_gates["int8"].tolerance["unet"] > p.tolerance["unet"]
    assert int8.tolerance["vae_decoder"] == p.tolerance["vae_decoder"]  # not quantized: fp32's tolerance
    assert int8.min_runtime_psnr_db == p.precision_gates["int8"].min_runtime_psnr_db < p.min_runtime_psnr_db
    assert p.for_precision("fp32") is p
    missing = PROFILE.split("[precision.int8]")[0] + "[latency_budget_ms]\nunet = 1.0\n"
    with pytest.raises(InputError, match=r"lists int8 but there is no \[precision.int8\]"):
        parse_profile(missing, "x")
    extra = PROFILE.replace('precisions = ["fp32", "int8"]', 'precisions = ["fp32"]')
    with pytest.raises(InputError, match=r"\[precision.int8\] for a precision 'precisions' does not list"):
        parse_profile(extra, "x")


# ------------------------------------------------------------------------------------------ fp16 overflow
def _stamped(model: onnx.ModelProto) -> onnx.ModelProto:
    set_metadata(model, sparsity_metadata(model, version="0", component="unet", method="magnitude",
                                          pattern="unstructured", profile="x86-ampere-gpu", source_sha256="0"))
    return model


def test_fp16_keeps_overflowing_nodes_fp32(tmp_path):
    """x @ W1 reaches ~1e5 (past fp16's 65504), then W2 scales it back: the first MatMul stays fp32, the rest is fp16,
    and the file computes what the fp32 one does; the weights' zeros are still counted through the Cast."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 16)) * 2e4).astype(np.float32)
    w1[:, :4] = 0
    w2 = (rng.standard_normal((16, 8)) * 1e-4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="big"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="small")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = _stamped(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    (path.parent / "config.json").write_text("{}")
    feed = {"x": rng.standard_normal((1, 16)).astype(np.float32)}
    ref = ort.InferenceSession(str(path)).run(None, feed)[0]

    c = P.to_fp16(path, "unet", feed, threshold=2**31)
    assert c.kept_float == ("big",) and c.precision == "fp16" and "32752" in c.why_kept
    got = onnx.load(str(path))
    types = {i.name: i.data_type for i in got.graph.initializer}
    assert types["w2"] == TensorProto.FLOAT16
    assert (path.parent / "config.json").is_file()  # the rest of the component's dir is left as it was
    out = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2e-3 * np.abs(ref).max()
    meta = read_metadata(got)
    assert meta["tinyprune.precision"] == weights_precision(got) == "fp16"
    assert json.loads(meta["tinyprune.tensors"])["w1"]["sparsity"] == 0.25
    assert check_claims(got) == []


def _three_convs(tmp_path, rng):
    """conv_in -> Relu -> a middle conv -> Relu -> conv_out, nodes named as the trace names a UNet's, in a
    stamped unet/model.onnx; its calibration feeds."""
    w = {n: (rng.standard_normal(shape) * 0.5).astype(np.float32)
         for n, shape in {"w_in": (8, 4, 3, 3), "w_mid": (8, 8, 3, 3), "w_out": (4, 8, 3, 3)}.items()}
    b = {f"b{k[1:]}": rng.standard_normal(v.shape[0]).astype(np.float32) for k, v in w.items()}
    conv = lambda x, wt, y, name: helper.make_node("Conv", [x, wt, "b" + wt[1:]], [y], name=name, pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv("sample", "w_in", "h1", "/unet/conv_in/Conv"), helper.make_node("Relu", ["h1"], ["r1"], name="r1"),
         conv("r1", "w_mid", "h2", "/unet/mid_block/resnets.0/conv1/Conv"),
         helper.make_node("Relu", ["h2"], ["r2"], name="r2"), conv("r2", "w_out", "out_sample", "/unet/conv_out/Conv")],
        "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in {**w, **b}.items()])
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(_stamped(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), str(path))
    return path, [{"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(12)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_layers_put_back_in_float_compute_the_fp32_graph(tmp_path, symmetric):
    """_in_float with every quantized node gives the fp32 model's outputs and no Q/DQ left; with conv_in alone,
    the pairs on its input and on its output (read by a Relu, not by a quantized layer) go, the rest stays."""
    rng = np.random.default_rng(0)
    path, feeds = _three_convs(tmp_path, rng)
    P._quantize(path, tmp_path / "q.onnx", feeds, symmetric)
    fp32, qdq = onnx.load(str(path)), onnx.load(str(tmp_path / "q.onnx"))
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, feeds[0])[0]
    everything = P._in_float(qdq, fp32, {n.name for n in fp32.graph.node if n.op_type == "Conv"})
    assert {n.op_type for n in everything.graph.node} == {"Conv", "Relu"}
    assert len(everything.graph.initializer) == 6
    assert np.abs(run(everything) - run(fp32)).max() < 1e-5
    one = P._in_float(qdq, fp32, {"/unet/conv_in/Conv"})
    dq = {o for n in one.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in one.graph.node}
    assert not set(by_name["/unet/conv_in/Conv"].input) & dq and set(by_name["/unet/conv_out/Conv"].input) & dq
    assert sum(n.op_type == "QuantizeLinear" for n in one.graph.node) == \
        sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) - 2  # sample's and h1's pairs
    err = lambda m: np.abs(run(m) - run(fp32)).max()
    assert err(one) < err(qdq)
    sample = [{"sample": f["sample"]} for f in feeds[:4]]
    gains, base = P.measure_fallback(fp32, qdq, sample)
    assert set(gains) == {"conv_in", "conv_out"}  # no time-embedding layer in this graph
    assert base == pytest.approx(P._output_sqnr(fp32, {"q": qdq}, sample)["q"])
    assert gains["conv_in"] == pytest.approx(P._output_sqnr(fp32, {"one": one}, sample)["one"] - base)


@pytest.mark.parametrize("bar, kept", [(-1e9, ("conv_in", "conv_out")), (1e9, ())])
def test_int8_keeps_float_the_groups_that_gain_the_bar(tmp_path, monkeypatch, bar, kept):
    rng = np.random.default_rng(1)
    path, feeds = _three_convs(tmp_path, rng)
    monkeypatch.setattr(P, "FALLBACK_MIN_GAIN_DB", bar)
    c = P.to_int8(path, "unet", feeds, symmetric=False, threshold=2**31)
    assert c.fallback.kept == kept and set(c.fallback.gains_db) == {"conv_in", "conv_out"}
    assert c.kept_float == tuple(sorted(f"/unet/{g}/Conv" for g in kept))
    assert c.nodes == 3 - len(kept) and bool(c.why_kept) == bool(kept)
    assert (c.fallback.final_db > c.fallback.all_int8_db) if kept else (c.fallback.final_db == c.fallback.all_int8_db)
    written = onnx.load(str(path))
    assert check_claims(written, str(path.parent)) == []
    dq = {o for n in written.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert {n.name for n in written.graph.node if n.op_type == "Conv" and not set(n.input) & dq} == set(c.kept_float)
    out = ort.InferenceSession(str(path)).run(None, feeds[0])[0]
    assert np.isfinite(out).all()
    d = c.to_dict()["fallback"]
    assert d["kept_float"] == list(kept) and d["output_sqnr_db"] == round(c.fallback.final_db, 2)


# ------------------------------------------------------------------------------------------ exports
@pytest.fixture(scope="module")
def int8_bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "b"
    r = invoke("export", "--model", tiny_dir, "--target", "x86-cpu", "--precision", "int8", "--image-checks", "1",
               "--image-steps", "2", "--out", out, "--json")
    assert r.exit_code in (0, 1), r.stderr
    return out, json.loads(r.stdout)


def test_int8_export(int8_bundle):
    out, report = int8_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["components"]["unet"]["precision"] == "int8"
    assert manifest["components"]["vae_decoder"]["precision"] == "fp32"
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    ops = [n.op_type for n in unet.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    meta = read_metadata(unet)
    assert meta["tinyprune.precision"] == weights_precision(unet) == "int8"
    assert abs(float(meta["tinyprune.sparsity"]) - report["sparsity"]["unet"]) < 0.01  # zeros survive quantization
    assert check_claims(unet, str(out / "unet")) == []
    # CPU target: uint8 activations (onnxruntime's fast x86 path)
    zero_points = {i.data_type for i in unet.graph.initializer if i.name.endswith("_zero_point") and "weight" not in i.name}
    assert TensorProto.UINT8 in zero_points
    p = report["precision"]
    assert p["components"]["unet"]["calibration_feeds"] == P.CALIBRATION_FEEDS
    fb = p["components"]["unet"]["fallback"]  # diffusers' UNet names: every candidate group is there and measured
    assert set(fb["gain_db"]) == set(P.FALLBACK_GROUPS)
    assert fb["kept_float"] == [g for g, v in fb["gain_db"].items() if v >= fb["min_gain_db"]]
    dq = {o for n in unet.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    in_float = {n.name for n in unet.graph.node if n.op_type in P.QUANTIZED_OPS and not set(n.input) & dq}
    assert set(p["components"]["unet"]["kept_float"]) <= in_float
    assert p["unet_measured"]["speedup"] > 0 and p["unet_measured"]["backend"] == "ort-cpu"
    assert "int8" in report["speedup_source"]
    unet_drift = [d for d in report["onnx_drift"] if d["name"].startswith("unet")]
    assert unet_drift and all(d["tolerance"] == load_profile("x86-cpu").precision_gates["int8"].tolerance["unet"]
                              for d in unet_drift)
    assert report["runtime_drift"][0]["min_psnr_db"] == load_profile("x86-cpu").precision_gates["int8"].min_runtime_psnr_db
    r = invoke("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["precision"] == {"text_encoder": "fp32", "unet": "int8",
                                                                     "vae_decoder": "fp32", "vae_encoder": "fp32"}
    r = invoke("inspect", out / "unet" / "model.onnx", "--json")
    assert json.loads(r.stdout)["metadata"]["tinyprune.precision"] == "int8"


def test_int8_runs_in_the_bundle_runtime(int8_bundle):
    from tinyprune.runtime.generate import Runtime

    out, _ = int8_bundle
    with Runtime(out) as rt:
        img = rt.generate(["a handwritten seven"], seed=0, steps=2)
    assert img.shape[1] == 3 and np.isfinite(img).all()


def test_fp16_export_for_a_gpu_target(tiny_dir, tmp_path):
    out = tmp_path / "b"
    r = invoke("export", "--model", tiny_dir, "--target", "x86-ampere-gpu", "--precision", "fp16",
               "--image-checks", "1", "--image-steps", "2", "--out", out, "--json")
    assert r.exit_code in (0, 1), r.stderr
    report = json.loads(r.stdout)
    gates = load_profile("x86-ampere-gpu").precision_gates["fp16"]
    for d in report["onnx_drift"]:  # fp16 drift per component, within its fp16 gate
        comp = d["name"].split(".")[0]
        assert d["ok"] and d["tolerance"] == gates.tolerance.get(comp, d["tolerance"]), d
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["precision"] for c in manifest["components"].values()} == {"fp16"}
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    assert weights_precision(unet) == "fp16"
    assert [i.type.tensor_type.elem_type for i in unet.graph.input][0] == TensorProto.FLOAT  # fp32 I/O kept
    script = (out / "build" / "build_engines.sh").read_text()
    assert "--fp16" in script and "--int8" not in script
    assert invoke("verify", out).exit_code == 0


def test_int8_for_tensorrt_is_symmetric_with_int8_flag(tiny_dir, tmp_path):
    out = tmp_path / "b"
    r = invoke("export", "--model", tiny_dir, "--target", "jetson-agx-orin", "--pattern", "2:4", "--precision", "int8",
               "--image-checks", "0", "--out", out, "--json")
    assert r.exit_code in (0, 1), r.stderr
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    zps = [numpy_helper.to_array(i) for i in unet.graph.initializer if i.name.endswith("_zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # TensorRT: int8, zero point 0
    line = next(l for l in (out / "build" / "build_engines.sh").read_text().splitlines() if "unet.engine" in l)
    assert "--int8" in line and "--sparsity=enable" in line  # sparse int8: NVIDIA's combination for Orin
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["tensors_2to4"]  # 2:4 recounted through the DequantizeLinear
    assert invoke("verify", out).exit_code == 0


def test_precision_refusals(tiny_dir, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error(invoke("export", "--model", tiny_dir, "--target", "jetson-nano", "--precision", "int8",
                            "--out", out, "--force"), 2)
    assert "jetson-nano runs fp32, fp16" in line
    assert (out / "keep.txt").read_text() == "mine"
    assert "unknown --precision 'int4'" in one_error(invoke("export", "--precision", "int4"), 2)
