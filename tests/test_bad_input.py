"""Bad input through the CLI (Typer's CliRunner): each case gives exactly one `error:` line, no traceback, and
its exit code (2 bad input, 1 gate/verify or the machine failed, e.g. disk full). tests/test_cli.py holds the
first cases (sparsity, unknown target, 2:4 without sparse tensor cores, broken model dirs, existing --out)."""

import errno
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from tinyprune.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error(r, code: int) -> str:
    """The single error line of a run that failed with `code`; asserts there is no traceback."""
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def copy_of(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ model dirs
def test_empty_model_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("export", "--model", empty, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {empty} is not a diffusers pipeline: model_index.json is missing"
    assert not (tmp_path / "out").exists()


def test_model_index_not_json(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    (bad / "model_index.json").write_text("{not json")
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == (f"error: {bad}/model_index.json is not valid JSON "
                               "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")


def test_model_index_not_an_object(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    (bad / "model_index.json").write_text("[1, 2]")
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {bad}/model_index.json is not a JSON object"


def test_unsupported_scheduler(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    cfg = bad / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), _class_name="LMSDiscreteScheduler")))
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == (f"error: {bad}/scheduler: unsupported scheduler 'LMSDiscreteScheduler'; supported: "
                               "DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDPMScheduler, "
                               "PNDMScheduler, DPMSolverMultistepScheduler, LCMScheduler")


SUPPORTED = ("supported: StableDiffusionPipeline; StableDiffusionXLPipeline; LatentConsistencyModelPipeline; "
             "DDPMPipeline; LDMPipeline")


def test_unknown_pipeline_class_with_a_text_encoder(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == (f"error: {bad}: pipeline KandinskyPipeline (scheduler DDIMScheduler, "
                               "text_encoder CLIPTextModel, tokenizer CLIPTokenizer, unet UNet2DConditionModel, "
                               f"vae AutoencoderKL) is not supported; {SUPPORTED}")


def test_unconditional_unet_class(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    index = json.loads((bad / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {bad}: component 'unet' is UNet2DModel; this family takes UNet2DConditionModel"


def test_component_without_weights(tiny_dir, tmp_path):
    bad = copy_of(tiny_dir, tmp_path)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {bad}/unet has no weights (no .safetensors file)"


def test_corrupt_safetensors_header(tiny_dir, tmp_path):
    """Same size as the real file, garbage where the header is: refused, not a traceback."""
    bad = copy_of(tiny_dir, tmp_path)
    path = bad / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert one_error(r, 2).startswith(f"error: {bad}/vae: weights could not be loaded, corrupt or truncated? (")


# ------------------------------------------------------------------------------------------ options and profiles
@pytest.mark.parametrize("option, value, known", [("--pattern", "3:4", "PATTERNS"), ("--scope", "block", "SCOPES")])
def test_unknown_pattern_and_scope(tiny_dir, tmp_path, option, value, known):
    from tinyprune import config

    r = invoke("export", "--model", tiny_dir, option, value, "--out", tmp_path / "out")
    assert one_error(r, 2) == (f"error: unknown {option} '{value}'; known {option[2:]}s: "
                               f"{', '.join(getattr(config, known))}")


def test_unknown_method(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--method", "random", "--out", tmp_path / "out")
    assert one_error(r, 2).startswith("error: unknown --method 'random'; known methods: magnitude")


STRUCTURED_ONLY = "applies to --method diff-pruning, ld-pruner, ecodiff only"


@pytest.mark.parametrize("args, message", [
    (["--alpha", "1"], "--alpha applies to --method l1-grad only (got magnitude)"),
    (["--method", "ecodiff", "--beta", "0"], "--beta applies to --method l1-grad only (got ecodiff)"),
    (["--method", "diff-pruning", "--iterations", "2"], "--iterations applies to --method l1-grad only (got diff-pruning)"),
    (["--method", "l1-grad", "--pattern", "2:4", "--iterations", "2"], "--iterations does not apply to --pattern 2:4"),
    (["--method", "ld-pruner", "--l1", "1e-4"], "--l1 applies to --method magnitude, l1-grad only (got ld-pruner)"),
    (["--method", "ecodiff", "--recovery-target", "noise"],
     "--recovery-target applies to --method magnitude, l1-grad only (got ecodiff)"),
    (["--latency-aware"], f"--latency-aware {STRUCTURED_ONLY} (got magnitude)"),
    (["--method", "l1-grad", "--target-macs", "0.5"], f"--target-macs {STRUCTURED_ONLY} (got l1-grad)"),
    (["--recovery-minutes", "1"], f"--recovery-minutes {STRUCTURED_ONLY} (got magnitude)"),
    (["--cost-model", "macs"], f"--cost-model {STRUCTURED_ONLY} (got magnitude)"),
    (["--method", "auto", "--pattern", "2:4", "--latency-aware"], "--latency-aware does not apply to --pattern 2:4"),
    (["--method", "diff-pruning", "--no-latency-aware", "--cost-model", "macs"],
     "--cost-model is the cost of latency-aware allocation: drop --no-latency-aware"),
    (["--speedup", "2"], f"--speedup {STRUCTURED_ONLY} (got magnitude)"),
    (["--latency-budget-ms", "20"], f"--latency-budget-ms {STRUCTURED_ONLY} (got magnitude)"),
    (["--method", "ecodiff", "--speedup", "2", "--target-macs", "0.5"], "--target-macs and --speedup are both targets; give one"),
    (["--method", "ld-pruner", "--calibration-samples", "0"], "--calibration-samples must be an integer >= 1, got 0"),
])
@pytest.mark.parametrize("command", ["export", "prune"])
def test_option_the_method_does_not_read(tmp_path, command, args, message):
    """Refused before any work (no model is loaded: none is given), instead of silently ignored."""
    r = invoke(command, *args, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {message}" and r.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_method_auto_passes_the_method_check(tmp_path):
    """auto becomes l1-grad or a structured method only with the target: its options get through to it."""
    r = invoke("prune", "--method", "auto", "--latency-aware", "--alpha", "1", "--target", "nope", "--out",
               tmp_path / "out")
    assert one_error(r, 2).startswith("error: unknown target 'nope'; known targets:")


def test_negative_image_checks_is_a_usage_error(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--image-checks", "-1", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "Invalid value for '--image-checks'" in r.stderr and "Traceback" not in r.stderr


def _profile_text():
    from tinyprune.config import _profiles_dir

    return _profiles_dir().joinpath("jetson-orin-nano.toml").read_text()


def test_profile_toml_wrong_type(tiny_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(_profile_text().replace("max_opset = 20", 'max_opset = "20"'))
    r = invoke("export", "--model", tiny_dir, "--target", bad, "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: {bad}: field 'max_opset' must be int, got str '20'"


def test_profile_toml_not_toml(tiny_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    r = invoke("export", "--model", tiny_dir, "--target", bad, "--out", tmp_path / "out")
    assert one_error(r, 2).startswith(f"error: {bad}: not valid TOML (")


def test_profile_toml_missing(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--target", tmp_path / "nope.toml", "--out", tmp_path / "out")
    assert one_error(r, 2) == f"error: profile file {tmp_path / 'nope.toml'} does not exist"


# ------------------------------------------------------------------------------------------ --out
def test_out_is_a_file_even_with_force(tiny_dir, tmp_path):
    f = tmp_path / "out"
    f.write_text("not a bundle")
    r = invoke("export", "--model", tiny_dir, "--out", f, "--force")
    assert one_error(r, 2) == f"error: {f} exists and is not a directory"
    assert f.read_text() == "not a bundle"


def test_out_inside_a_file(tiny_dir, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = invoke("export", "--model", tiny_dir, "--out", f / "bundle")
    assert one_error(r, 2) == f"error: {f} is a file, not a directory: --out {f / 'bundle'} cannot be created inside it"


def test_out_parent_missing(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--out", tmp_path / "no" / "such" / "bundle")
    assert one_error(r, 2) == f"error: parent directory {tmp_path / 'no' / 'such'} of --out does not exist"


def test_out_not_writable(tiny_dir, tmp_path, monkeypatch):
    """Tests run as root, which ignores permission bits; so os.access answers as it would for a user
    without write permission on the parent (the check the CLI makes before any work)."""
    import os

    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(parent) and mode & os.W_OK
                        else real(p, mode, **kw))
    r = invoke("export", "--model", tiny_dir, "--out", parent / "bundle")
    assert one_error(r, 2) == f"error: cannot write to {parent}: permission denied"
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("filename", [None, "text_encoder/model.onnx_data"])
def test_disk_full_keeps_old_bundle(bundle, tiny_dir, tmp_path, monkeypatch, filename):
    """ENOSPC while the first ONNX file (the text encoder's) is written, after the pruned pipeline is saved: one line, exit 1,
    the staging dir is gone and the previous bundle at --out is byte-for-byte what it was."""
    import tinyprune.export.writer as onnx_export

    out = copy_of(bundle[0], tmp_path, "b")
    before = (out / "manifest.json").read_bytes()

    def full(model, path, external):
        path.write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(path.parent / "model.onnx_data") if filename else None)

    monkeypatch.setattr(onnx_export, "_write_model", full)
    r = invoke("export", "--model", tiny_dir, "--out", out, "--force", "--image-checks", "1", "--image-steps", "2")
    line = one_error(r, 1)
    if filename:
        assert line.startswith("error: disk full while writing ") and line.endswith(
            "/text_encoder/model.onnx_data: free some space and run again; nothing was published")
    else:
        assert line == f"error: disk full while writing {out}: free some space and run again; nothing was published"
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")] == []
    assert invoke("verify", out).exit_code == 0


# ------------------------------------------------------------------------------------------ inspect
def _external_model(path, location):
    """A one-node ONNX model whose weight lives in external data at `location`."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.zeros(16, np.float32).tobytes(), raw=True)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=k, value=v)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_inspect_refuses_escaping_external_data(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    d = tmp_path / "m"
    d.mkdir()
    path = _external_model(d / "model.onnx", location)
    r = invoke("inspect", path)
    assert one_error(r, 2) == (f"error: {path}: external data location '{location}' escapes the model directory; "
                               "refused")


def test_inspect_missing_external_data(tmp_path):
    path = _external_model(tmp_path / "model.onnx", "model.onnx.data")
    r = invoke("inspect", path)
    assert one_error(r, 2) == f"error: {path}: external data file 'model.onnx.data' is missing"


@pytest.mark.parametrize("content", [b"hello, not onnx\n", b""])
def test_inspect_not_onnx(tmp_path, content):
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    r = invoke("inspect", path)
    reason = "DecodeError" if content else "no graph or IR version"
    assert one_error(r, 2) == f"error: {path} is not a valid ONNX file ({reason})"


def test_inspect_missing_file(tmp_path):
    r = invoke("inspect", tmp_path / "nope.onnx")
    assert one_error(r, 2) == f"error: {tmp_path / 'nope.onnx'} does not exist or is not a file"


# ------------------------------------------------------------------------------------------ verify / validate
@pytest.mark.parametrize("command", ["verify", "validate"])
def test_not_a_bundle(tmp_path, command):
    d = tmp_path / "d"
    d.mkdir()
    r = invoke(command, d)
    assert one_error(r, 2) == f"error: {d} is not a tinyprune bundle: manifest.json is missing"


@pytest.mark.parametrize("command", ["verify", "validate"])
def test_bundle_is_a_file(tmp_path, command):
    f = tmp_path / "bundle.zip"
    f.write_bytes(b"PK")
    r = invoke(command, f)
    assert one_error(r, 2) == f"error: {f} is a file; expected a bundle directory (the --out of tinyprune export)"


def test_manifest_not_json(bundle, tmp_path):
    out = copy_of(bundle[0], tmp_path)
    (out / "manifest.json").write_text("{")
    r = invoke("verify", out)
    assert one_error(r, 2).startswith(f"error: {out}/manifest.json is not valid JSON (")


def test_verify_one_byte_changed_in_unet(bundle, tmp_path):
    out = copy_of(bundle[0], tmp_path)
    path = out / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    r = invoke("verify", out)
    assert one_error(r, 1) == "error: verify failed: unet/model.onnx: checksum mismatch"


def test_verify_missing_and_extra_file(bundle, tmp_path):
    out = copy_of(bundle[0], tmp_path)
    (out / "vae_encoder" / "model.onnx").unlink()
    (out / "stray.txt").write_text("x")
    r = invoke("verify", out)
    assert one_error(r, 1) == "error: verify failed: vae_encoder/model.onnx: missing (+1 more)"
    assert "stray.txt: not in the manifest" in r.stderr


def test_verify_false_metadata_claim(bundle, tmp_path):
    """Checksums re-made to match, but the ONNX metadata claims a sparsity the weights do not hold."""
    from tinyprune.ship.bundle import sha256_file
    from tinyprune.export.metadata import read_metadata, set_metadata

    out = copy_of(bundle[0], tmp_path)
    path = out / "unet" / "model.onnx"
    model = onnx.load(str(path))
    meta = read_metadata(model)
    actual = float(meta["tinyprune.sparsity"])
    set_metadata(model, {k: v for k, v in meta.items() if k.startswith("tinyprune.")} | {"tinyprune.sparsity": "0.900000"})
    onnx.save(model, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["unet/model.onnx"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = invoke("verify", out)
    assert one_error(r, 1) == (f"error: verify failed: unet/model.onnx: tinyprune.sparsity claims 0.900000, "
                               f"weights hold {actual:.6f}")


def test_out_of_memory_while_loading_is_not_called_corrupt(tiny_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", no_memory)
    r = invoke("export", "--model", tiny_dir, "--out", tmp_path / "out")
    assert one_error(r, 1) == (f"error: {tiny_dir}/vae: not enough memory to load these weights here (the file is "
                               "not the problem): free memory or use a machine with more")
    assert not (tmp_path / "out").exists()
