"""TensorRT part of `tinyprune build`: exact trtexec lines per target, the on-device script, the (Sparsity) log parser
on real TensorRT log lines (tests/data/trt_logs, each file names its source), 2:4 tensor matching, build() without
tensorrt, and a real engine build where tensorrt and a GPU are present."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tinyprune.ship import tensorrt as trt_build
from tinyprune.ship.bundle import sha256_file
from tinyprune.config import load_profile
from tinyprune.errors import BackendMissing, InputError
from tinyprune.ship.tensorrt import (
    NOTICE, SparseLayerReport, _log_line, build, parse_build_log, shape_spec, trt_version_tuple, trtexec_command,
    unpicked_2to4_tensors, weight_consumers, write_build_script,
)
from tinyprune.runtime.trt import TrtRunner

LOGS = Path(__file__).parent / "data" / "trt_logs"

UNET_INPUTS = {
    "sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]},
    "timestep": {"min": [1], "opt": [2], "max": [2]},
    "encoder_hidden_states": {"min": [1, 1, 64], "opt": [2, 1, 64], "max": [2, 1, 64]},
}
MIN = "--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x1x64"
OPT = "--optShapes=sample:2x4x8x8,timestep:2,encoder_hidden_states:2x1x64"
MAX = "--maxShapes=sample:2x4x8x8,timestep:2,encoder_hidden_states:2x1x64"
CONV1 = "down_blocks.0.resnets.0.conv1.weight"


def unet(tensors_2to4=(CONV1,)) -> dict:
    return {"file": "unet/model.onnx", "pattern": "2:4" if tensors_2to4 else "none",
            "tensors_2to4": list(tensors_2to4), "inputs": UNET_INPUTS, "outputs": ["out_sample"]}


def tiny_unet_onnx(path: Path) -> None:
    """A two-op graph named the way the TorchScript exporter names a diffusers UNet: a Conv reading a torch
    parameter, a MatMul reading the exporter's transposed copy of a Linear weight."""
    w_conv = np.zeros((8, 4, 3, 3), np.float32)
    w_conv[:, 0::4] = 1.0
    w_conv[:, 1::4] = -1.0  # 2 of every 4 input channels zero
    w_q = np.ones((8, 8), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["sample", CONV1], ["h"], name="/down_blocks.0/resnets.0/conv1/Conv", pads=[1] * 4),
         helper.make_node("Transpose", ["h"], ["t"], name="/Transpose", perm=[0, 2, 3, 1]),
         helper.make_node("MatMul", ["t", "onnx::MatMul_7"], ["out_sample"],
                          name="/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul")],
        "unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 8, 8, 8])],
        [numpy_helper.from_array(w_conv, CONV1), numpy_helper.from_array(w_q, "onnx::MatMul_7")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_bundle(root: Path, tensors_2to4=(CONV1,), profile="jetson-orin-nano") -> dict:
    manifest = {
        "profile": profile,
        "components": {
            "unet": unet(tensors_2to4),
            "vae_decoder": {"file": "vae_decoder/model.onnx", "pattern": "none", "tensors_2to4": [],
                            "inputs": {"latent": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}},
                            "outputs": ["image"]},
        },
        "files": {},
    }
    tiny_unet_onnx(root / "unet" / "model.onnx")
    tiny_unet_onnx(root / "vae_decoder" / "model.onnx")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


# ---- trtexec lines -----------------------------------------------------------------------------------------

def test_versions_and_shape_strings():
    assert trt_version_tuple("8.2.1") == (8, 2, 1) and trt_version_tuple("10.3") == (10, 3)
    assert trt_version_tuple("8.5.2") < (8, 6) <= trt_version_tuple("10.0")
    assert shape_spec(UNET_INPUTS, "min") == "sample:1x4x8x8,timestep:1,encoder_hidden_states:1x1x64"
    assert shape_spec(UNET_INPUTS, "max") == "sample:2x4x8x8,timestep:2,encoder_hidden_states:2x1x64"


def test_orin_nano_sparse_component_gets_sparsity_and_trt10_flags():
    assert trtexec_command("unet", unet(), load_profile("jetson-orin-nano")) == [
        "trtexec", "--onnx=unet/model.onnx", "--saveEngine=build/unet.engine", "--fp16", "--sparsity=enable",
        MIN, OPT, MAX, "--memPoolSize=workspace:1024", "--timingCacheFile=build/timing.cache",
        "--profilingVerbosity=detailed", "--exportLayerInfo=build/unet.layers.json", "--skipInference", "--verbose",
    ]


def test_orin_nano_without_2to4_tensors_has_no_sparsity():
    argv = trtexec_command("unet", unet(()), load_profile("jetson-orin-nano"))
    assert "--sparsity=enable" not in argv
    assert argv[:4] == ["trtexec", "--onnx=unet/model.onnx", "--saveEngine=build/unet.engine", "--fp16"]
    assert argv[4:7] == [MIN, OPT, MAX]


def test_xavier_nx_never_gets_sparsity_and_uses_trt85_flags():
    assert trtexec_command("unet", unet(), load_profile("jetson-xavier-nx")) == [
        "trtexec", "--onnx=unet/model.onnx", "--saveEngine=build/unet.engine", "--fp16",
        MIN, OPT, MAX, "--memPoolSize=workspace:1024", "--timingCacheFile=build/timing.cache",
        "--profilingVerbosity=detailed", "--exportLayerInfo=build/unet.layers.json", "--buildOnly", "--verbose",
    ]


def test_xavier_nx_on_dla_has_static_shapes_and_gpu_fallback():
    argv = trtexec_command("unet", unet(), load_profile("jetson-xavier-nx"), dla=True)
    assert argv[4:7] == [OPT.replace("opt", "min"), OPT, OPT.replace("opt", "max")]
    assert argv[7:10] == ["--memPoolSize=workspace:1024", "--useDLACore=0", "--allowGPUFallback"]
    assert "--sparsity=enable" not in argv


def test_nano_uses_trt82_workspace_syntax_and_no_layer_info():
    assert trtexec_command("unet", unet(), load_profile("jetson-nano")) == [
        "trtexec", "--onnx=unet/model.onnx", "--saveEngine=build/unet.engine", "--fp16",
        MIN, OPT, MAX, "--workspace=512", "--timingCacheFile=build/timing.cache", "--buildOnly", "--verbose",
    ]


def test_targets_without_tensorrt_or_dla_are_refused():
    with pytest.raises(InputError, match="target x86-cpu has no TensorRT"):
        trtexec_command("unet", unet(), load_profile("x86-cpu"))
    with pytest.raises(InputError, match="no DLA cores"):
        trtexec_command("unet", unet(), load_profile("jetson-orin-nano"), dla=True)


# ---- the script and README ---------------------------------------------------------------------------------

def test_script_is_deterministic_executable_and_holds_exact_lines(tmp_path):
    profile = load_profile("jetson-orin-nano")
    a, b = tmp_path / "a", tmp_path / "b"
    manifest = make_bundle(a)
    make_bundle(b)
    script = write_build_script(a, manifest, profile)
    assert script == a / "build" / "build_engines.sh"
    write_build_script(b, manifest, profile)
    for rel in ("build/build_engines.sh", "build/README.md"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    write_build_script(a, manifest, profile)  # rewriting gives the same bytes again
    assert script.read_bytes() == (b / "build" / "build_engines.sh").read_bytes()
    assert os.stat(script).st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail\n" in text and 'export PATH="$PATH:/usr/src/tensorrt/bin"' in text
    assert "jetson-orin-nano" in text and "TensorRT 10.3 (JetPack 6.2)" in text
    assert "tied to the GPU architecture and the TensorRT version" in text
    lines = [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("build_component ")]
    assert lines == [["unet"] + trtexec_command("unet", manifest["components"]["unet"], profile),
                     ["vae_decoder"] + trtexec_command("vae_decoder", manifest["components"]["vae_decoder"], profile)]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    readme = (a / "build" / "README.md").read_text()
    assert 'grep -F "(Sparsity)" build/unet.build.log' in readme and "Sparsity is enabled for: unet." in readme


def test_xavier_script_and_readme_say_no_sparse_tensor_cores(tmp_path):
    manifest = make_bundle(tmp_path)
    text = write_build_script(tmp_path, manifest, load_profile("jetson-xavier-nx")).read_text()
    assert "--sparsity=enable" not in text
    assert "# jetson-xavier-nx has no sparse tensor cores: zeros give no speed-up there, so no --sparsity." in text
    assert "jetson-xavier-nx has no sparse tensor cores" in (tmp_path / "build" / "README.md").read_text()


def test_script_refuses_a_bundle_missing_its_onnx(tmp_path):
    manifest = make_bundle(tmp_path)
    (tmp_path / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(InputError, match="lacks vae_decoder/model.onnx"):
        write_build_script(tmp_path, manifest, load_profile("jetson-orin-nano"))


FAKE_TRTEXEC = """#!/bin/sh
for a in "$@"; do case "$a" in --saveEngine=*) out="${a#--saveEngine=}";; esac; done
echo "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: /down_blocks.0/resnets.0/conv1/Conv"
echo "args: $*"
printf engine > "$out"
"""


def test_script_runs_trtexec_per_component_and_keeps_logs(tmp_path):
    bundle = tmp_path / "bundle"
    manifest = make_bundle(bundle)
    profile = load_profile("jetson-orin-nano")
    script = write_build_script(bundle, manifest, profile)
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": f"{fake.parent}:/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    for name, comp in manifest["components"].items():
        assert (bundle / "build" / f"{name}.engine").read_bytes() == b"engine"
        log = (bundle / "build" / f"{name}.build.log").read_text()
        assert f"args: {' '.join(trtexec_command(name, comp, profile)[1:])}\n" in log
    assert run.stdout.count("(Sparsity) Layers eligible") == 2  # echoed from each log


@pytest.mark.skipif(shutil.which("trtexec", path="/usr/bin:/bin:/usr/src/tensorrt/bin") is not None,
                    reason="this machine has trtexec")
def test_script_without_trtexec_exits_3(tmp_path):
    manifest = make_bundle(tmp_path)
    script = write_build_script(tmp_path, manifest, load_profile("jetson-orin-nano"))
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 3
    assert "trtexec is neither on PATH nor in /usr/src/tensorrt/bin" in run.stderr
    assert not (tmp_path / "build" / "unet.engine").exists()


# ---- the log parser on real TensorRT lines -----------------------------------------------------------------

def test_developer_guide_lines():
    r = parse_build_log((LOGS / "developer_guide.txt").read_text())
    assert r == SparseLayerReport(("conv1", "conv2", "conv3"), ("conv2", "conv3"), True)
    assert r.not_picked() == ("conv1",)


def test_terminal_wrapped_list_is_joined():
    text = (LOGS / "trtexec_wrapped_matmul_issue2169.txt").read_text()
    r = parse_build_log(text)
    # Every layer in the wrapped list, counted on the text with the wraps undone.
    names = re.findall(r"\b(?:Conv|MatMul|Gemm)_\d+", text.split("eligible for sparse math:")[1].replace("\n", ""))
    assert r.eligible == tuple(n for n in names)
    assert len(r.eligible) == 50 and r.eligible[:3] == ("Conv_22", "MatMul_51", "MatMul_69")
    assert "MatMul_139" in r.eligible and r.eligible[-1] == "Gemm_725"
    assert r.picked == () and r.reported
    assert r.not_picked() == r.eligible


def test_wrapped_fused_names_are_rejoined_at_the_plus():
    r = parse_build_log((LOGS / "trtexec_wrapped_fused_issue2169.txt").read_text())
    assert r.eligible[:3] == ("Conv_3 + Relu_4", "Conv_8", "Conv_7 + Add_9 + Relu_10")
    for fused in ("Conv_15 + Add_16 + Relu_17", "Conv_37 + Add_38 + Relu_39", "Conv_58 + Add_60 + Relu_61",
                  "Conv_83 + Relu_84", "Conv_108 + Add_109 + Relu_110"):
        assert fused in r.eligible
    assert len(r.eligible) == 37 and r.eligible[-1] == "Conv_122 + Add_123 + Relu_124"


def test_long_unwrapped_fused_line():
    r = parse_build_log((LOGS / "trtexec_fused_issue4054.txt").read_text())
    assert len(r.eligible) == 44
    assert r.eligible[:2] == ("MatMul_401", "Conv_619 + Relu_620")
    assert r.eligible[-1] == "Conv_297 + Add_298 + Relu_299"
    assert all("\n" not in e and e == e.strip() for e in r.eligible)


def test_empty_lists_do_not_swallow_the_next_records():
    r = parse_build_log((LOGS / "torch_tensorrt_empty_issue1340.txt").read_text())
    assert r == SparseLayerReport((), (), True)


def test_trt80_python_logger_format():
    r = parse_build_log((LOGS / "python_api_trt80_issue1403.txt").read_text())
    assert (r.eligible, r.picked, r.not_picked()) == (("Conv_0",), (), ("Conv_0",))


def test_python_logger_format_and_our_own_logger_lines():
    composite = parse_build_log((LOGS / "python_api_composite.txt").read_text())
    fused = "/down_blocks.0/resnets.0/conv1/Conv + /down_blocks.0/resnets.0/nonlinearity/Mul"
    assert composite.picked == (fused,)
    assert composite.eligible == ("/conv_in/Conv", fused,
                                  "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul")
    ours = "".join([
        _log_line("V", "Tactic: 0x0000000000000000 Time: 0.1"),
        _log_line("I", "(Sparsity) Layers eligible for sparse math: /conv_in/Conv, " + fused),
        _log_line("I", "(Sparsity) TRT inference plan picked sparse implementation for layers: " + fused),
        _log_line("V", "Engine Layer Information:\nLayer(CaskConvolution): /conv_in/Conv"),  # a multi-line message
    ])
    assert ours.startswith("[TRT] [V] ")
    assert parse_build_log(ours) == SparseLayerReport(("/conv_in/Conv", fused), (fused,), True)


def test_a_log_without_sparsity_lines_reports_nothing():
    r = parse_build_log("[03/02/2023-11:33:46] [TRT] [I] Input filename:   densenet121.onnx\n")
    assert r == SparseLayerReport((), (), False)


# ---- which 2:4 tensors ran dense ---------------------------------------------------------------------------

def test_unpicked_2to4_tensors_by_module_path_and_by_consumer():
    report = parse_build_log((LOGS / "python_api_composite.txt").read_text())
    tensors = [CONV1, "conv_in.weight", "onnx::MatMul_7"]
    assert unpicked_2to4_tensors(report, tensors) == ["conv_in.weight", "onnx::MatMul_7"]
    q = "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul"
    picked_q = SparseLayerReport(report.eligible, report.picked + (q,), True)
    # Without the graph, the exporter's renamed MatMul weight cannot be placed; with it, it can.
    assert unpicked_2to4_tensors(picked_q, tensors) == ["conv_in.weight", "onnx::MatMul_7"]
    assert unpicked_2to4_tensors(picked_q, tensors, {"onnx::MatMul_7": [q]}) == ["conv_in.weight"]
    assert unpicked_2to4_tensors(SparseLayerReport((), (), True), tensors) == tensors


def test_myelin_region_ends_count_as_picked():
    report = SparseLayerReport((), ("{ForeignNode[/attn1/to_q/MatMul.../attn1/to_out.0/MatMul]}",), True)
    assert unpicked_2to4_tensors(report, ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_out.0.weight"]) \
        == ["attn1.to_k.weight"]


def test_weight_consumers_on_a_torchscript_export(tmp_path):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.to_q = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.to_q(self.conv1(x).flatten(2).transpose(1, 2))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(Net().eval(), (torch.zeros(1, 4, 4, 4),), str(path), dynamo=False, opset_version=17)
    consumers = weight_consumers(path)
    assert consumers["block.conv1.weight"] == ["/block/conv1/Conv"]
    renamed = [name for name in consumers if name.startswith("onnx::MatMul")]
    assert len(renamed) == 1 and consumers[renamed[0]] == ["/block/to_q/MatMul"]
    report = SparseLayerReport((), ("/block/conv1/Conv", "/block/to_q/MatMul"), True)
    assert unpicked_2to4_tensors(report, ["block.conv1.weight", renamed[0]], consumers) == []
    report = SparseLayerReport((), ("/block/to_q/MatMul",), True)
    assert unpicked_2to4_tensors(report, ["block.conv1.weight", renamed[0]], consumers) == ["block.conv1.weight"]


# ---- build() -----------------------------------------------------------------------------------------------

def test_build_without_tensorrt_writes_the_script_and_says_so(tmp_path, no_tensorrt):
    make_bundle(tmp_path)
    result = build(tmp_path, None, require_engine=False)
    assert result["engines"] == {} and result["notice"] == NOTICE
    assert result["script"] == "build/build_engines.sh" and result["target"] == "jetson-orin-nano"
    assert "tensorrt is not installed" in result["reason"]
    assert result["sparse"] == {}  # no logs copied back yet
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert files["build/build_engines.sh"] == sha256_file(tmp_path / "build" / "build_engines.sh")
    assert files["build/README.md"] == sha256_file(tmp_path / "build" / "README.md")


def test_build_require_engine_raises_backend_missing_after_writing_the_script(tmp_path, no_tensorrt):
    make_bundle(tmp_path)
    with pytest.raises(BackendMissing) as e:
        build(tmp_path, "jetson-xavier-nx", require_engine=True)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert str(e.value).startswith("no engine built: tensorrt is not installed here")
    assert str(e.value).endswith("run build/build_engines.sh on the jetson-xavier-nx")
    assert "--sparsity=enable" not in (tmp_path / "build" / "build_engines.sh").read_text()


def test_build_refuses_cpu_targets_and_non_bundles(tmp_path, no_tensorrt):
    make_bundle(tmp_path)
    with pytest.raises(InputError, match="target x86-cpu has no TensorRT"):
        build(tmp_path, "x86-cpu", require_engine=False)
    assert not (tmp_path / "build").exists()
    with pytest.raises(InputError, match="manifest.json is missing"):
        build(tmp_path / "unet", None, require_engine=False)
    with pytest.raises(InputError, match="unknown target"):
        build(tmp_path, "jetson-nope", require_engine=False)


def test_jetson_target_is_not_built_on_another_machine_even_with_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))  # importable
    monkeypatch.setattr(trt_build, "_jetson_cc", lambda: None)
    monkeypatch.setattr(trt_build, "build_engines", lambda *a, **k: pytest.fail("must not build here"))
    make_bundle(tmp_path)
    result = build(tmp_path, None, require_engine=False)
    assert result["notice"] == NOTICE and "this machine is not a Jetson" in result["reason"]
    monkeypatch.setattr(trt_build, "_jetson_cc", lambda: "7.2")  # a Xavier cannot build Orin engines
    assert "compute capability 7.2" in build(tmp_path, None, require_engine=False)["reason"]


def test_build_reads_logs_copied_back_from_the_device(tmp_path, no_tensorrt):
    make_bundle(tmp_path, tensors_2to4=(CONV1, "onnx::MatMul_7"))
    (tmp_path / "build").mkdir()
    q = "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul"
    (tmp_path / "build" / "unet.build.log").write_text(
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: "
        f"/down_blocks.0/resnets.0/conv1/Conv, {q}\n"
        f"[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: {q}\n")
    sparse = build(tmp_path, None, require_engine=False)["sparse"]
    assert list(sparse) == ["unet"]
    assert sparse["unet"]["picked"] == [q] and sparse["unet"]["not_picked"] == ["/down_blocks.0/resnets.0/conv1/Conv"]
    assert sparse["unet"]["unpicked_2to4"] == [CONV1]  # the MatMul weight is placed through the ONNX graph
    assert sparse["unet"]["ineligible_2to4"] == []  # conv1 was eligible: it ran dense because dense was faster
    (tmp_path / "build" / "unet.build.log").write_text(
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math:\n"
        "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:\n")
    sparse = build(tmp_path, None, require_engine=False)["sparse"]["unet"]
    assert sparse["unpicked_2to4"] == sparse["ineligible_2to4"] == [CONV1, "onnx::MatMul_7"]
    (tmp_path / "build" / "unet.build.log").write_text("[TRT] [I] built without --sparsity\n")
    sparse = build(tmp_path, None, require_engine=False)["sparse"]["unet"]
    assert sparse["reported"] is False and sparse["unpicked_2to4"] == []  # TensorRT said nothing: no claim


def _half_dump(obj, fp, **kw):
    """json.dump that dies after writing half the document, as a full disk would."""
    text = json.dumps(obj, **kw)
    fp.write(text[: len(text) // 2])
    fp.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _io_error(*args, **kwargs):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("fail_at", ["dump", "fsync", "replace"])
def test_build_never_leaves_a_half_written_manifest(tmp_path, no_tensorrt, monkeypatch, fail_at):
    make_bundle(tmp_path)
    build(tmp_path, None, require_engine=False)
    manifest = tmp_path / "manifest.json"
    before = manifest.read_bytes()
    listing = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    # A log copied back from the device: the next build's manifest differs from the one on disk.
    (tmp_path / "build" / "unet.build.log").write_text("[TRT] [I] built without --sparsity\n")
    with monkeypatch.context() as m:
        if fail_at == "dump":
            m.setattr(json, "dump", _half_dump)
        else:
            m.setattr(os, fail_at, _io_error)
        with pytest.raises(OSError):
            build(tmp_path, None, require_engine=False)
    assert manifest.read_bytes() == before  # the old manifest, whole
    assert "build/unet.build.log" not in json.loads(before)["files"]
    # No temp file left beside it: the tree is the old one plus the log this test wrote.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) \
        == sorted(listing + ["build/unet.build.log"])
    build(tmp_path, None, require_engine=False)  # the write works again once the disk does
    files = json.loads(manifest.read_text())["files"]
    assert files["build/unet.build.log"] == sha256_file(tmp_path / "build" / "unet.build.log")
    # The replacement has a plain file's mode (umask applied), not a private temp file's 0600.
    assert stat.S_IMODE(manifest.stat().st_mode) == stat.S_IMODE((tmp_path / "build" / "README.md").stat().st_mode)


# ---- the engine runner -------------------------------------------------------------------------------------

def test_trt_runner_without_engine_or_tensorrt(tmp_path, no_tensorrt):
    with pytest.raises(InputError, match="does not exist"):
        TrtRunner(tmp_path / "missing.engine").activate()
    engine = tmp_path / "unet.engine"
    engine.write_bytes(b"plan")
    runner = TrtRunner(engine)
    with pytest.raises(BackendMissing, match="tensorrt is not installed"):
        with runner:
            pass
    assert not runner.active
    with pytest.raises(RuntimeError, match="before activate"):
        runner({})


def test_modules_import_neither_tensorrt_nor_torch():
    code = ("import sys, tinyprune.ship.tensorrt, tinyprune.runtime.trt; "
            "print(sorted(m for m in ('tensorrt', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- a real engine -----------------------------------------------------------------------------------------

@pytest.mark.tensorrt
def test_real_engine_build_and_run_matches_onnxruntime(tmp_path):
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnxruntime as ort

    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():  # 2:4 along input channels: 2 of every 4 consecutive C are zero
        conv.weight[:, 2::4] = 0
        conv.weight[:, 3::4] = 0
    net = torch.nn.Sequential()
    net.add_module("conv", conv)
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    torch.onnx.export(net.eval(), (torch.zeros(1, 64, 16, 16),), str(path), input_names=["sample"],
                      output_names=["out_sample"], dynamic_axes={"sample": {0: "b"}, "out_sample": {0: "b"}},
                      dynamo=False, opset_version=17)
    shapes = {"sample": {"min": [1, 64, 16, 16], "opt": [2, 64, 16, 16], "max": [2, 64, 16, 16]}}
    manifest = {"profile": "x86-ampere-gpu", "components": {
        "unet": {"file": "unet/model.onnx", "pattern": "2:4", "tensors_2to4": ["conv.weight"],
                 "inputs": shapes, "outputs": ["out_sample"]}}}
    result = trt_build.build_engines(tmp_path, manifest, load_profile("x86-ampere-gpu"), log=lambda m: None)
    unet_result = result["unet"]
    assert (tmp_path / unet_result["engine"]).stat().st_size > 0
    assert (tmp_path / "build" / "timing.cache").stat().st_size > 0
    assert json.loads((tmp_path / "build" / "unet.layers.json").read_text())
    log = (tmp_path / "build" / "unet.build.log").read_text()
    assert log.startswith("[TRT] [") and unet_result["sparse"]["reported"], trt.__version__
    x = np.random.default_rng(0).standard_normal((2, 64, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"sample": x})[0]
    with TrtRunner(tmp_path / unet_result["engine"]) as runner:
        got = runner({"sample": x})["out_sample"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 5e-2  # fp16 kernels
