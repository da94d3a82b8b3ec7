"""verify on a hand-made bundle: each kind of finding alone, the message it gives, and the honest bundle passing.

No export: a one-component bundle (tests/test_claims_fail.py's two-node model as unet/model.onnx, a manifest of its
files), fast enough for the mutation run (benchmarks/mutation.py) to select."""

from __future__ import annotations

import json

import onnx
import pytest

from test_claims_fail import _edit, _model
from tinyprune.errors import GateFailed, InputError
from tinyprune.ship.bundle import MANIFEST, TIMINGS, file_table, sha256_file
from tinyprune.ship.verify import verify


def _bundle(tmp_path, model=None, profile="x86-cpu", extra: dict | None = None):
    root = tmp_path / "b"
    (root / "unet").mkdir(parents=True)
    (root / "report").mkdir()
    onnx.save(model or _model(), str(root / "unet" / "model.onnx"))
    (root / "report" / "report.md").write_text("report\n")
    (root / TIMINGS).write_text("{}\n")  # outside the checksums: it changes every run
    manifest = {"profile": profile, "files": file_table(root),
                "components": {"unet": {"file": "unet/model.onnx"}}} | (extra or {})
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def _problems(root, target=None) -> list[str]:
    with pytest.raises(GateFailed) as e:
        verify(root, target)
    result = e.value.result
    assert result["ok"] is False and str(e.value) == (f"verify failed: {result['problems'][0]}" + (
        f" (+{len(result['problems']) - 1} more)" if len(result["problems"]) > 1 else ""))
    return result["problems"]


def test_an_honest_bundle_passes(tmp_path):
    root = _bundle(tmp_path)
    assert verify(root) == {"bundle": str(root), "files": 2, "problems": [], "precision": {"unet": "fp32"},
                            "target": "x86-cpu", "trt_version": "", "ok": True}
    assert verify(root, "jetson")["target"] == "jetson-orin-nano"
    assert verify(root, "jetson")["trt_version"] == "10.3"


def test_a_bundle_of_an_unknown_profile_is_checked_without_a_target(tmp_path):
    root = _bundle(tmp_path, profile="my-board")
    assert verify(root)["target"] is None and verify(root)["trt_version"] is None
    assert verify(_bundle(tmp_path / "n", profile=None))["target"] is None
    with pytest.raises(InputError):
        verify(root, "no-such-target")


def test_missing_changed_and_unlisted_files(tmp_path):
    root = _bundle(tmp_path)
    (root / "report" / "report.md").write_text("edited\n")
    assert _problems(root) == ["report/report.md: checksum mismatch"]
    (root / "report" / "report.md").unlink()
    assert _problems(root) == ["report/report.md: missing"]
    root = _bundle(tmp_path / "x")
    (root / "stray.txt").write_text("x")
    (root / "a.txt").write_text("x")
    assert _problems(root) == ["a.txt: not in the manifest", "stray.txt: not in the manifest"]


def test_a_changed_onnx_file_is_not_also_read_for_its_claims(tmp_path):
    root = _bundle(tmp_path)
    model = _edit(_model(), sparsity="0.9")
    onnx.save(model, str(root / "unet" / "model.onnx"))
    assert _problems(root) == ["unet/model.onnx: checksum mismatch"]


def test_false_claims_are_named_with_their_file(tmp_path):
    root = _bundle(tmp_path, _edit(_model(), sparsity="0.9", params="7", params_dense="100", params_removed="0.04"))
    problems = _problems(root)
    assert problems[0].startswith("unet/model.onnx: tinyprune.sparsity claims 0.900000")
    assert problems[1] == "unet/model.onnx: tinyprune.params claims 7, the file holds 96 prunable weights"
    assert len(problems) == 2


def test_the_targets_parser_is_asked(tmp_path):
    model = _model()
    model.opset_import[0].version = 18  # above x86-cpu's max opset 17 and jetson-nano's TensorRT 8.2 parser
    root = _bundle(tmp_path, model)
    (problem,) = _problems(root)
    assert problem.startswith("unet/model.onnx: ") and "opset 18" in problem
    assert _problems(root, "jetson-nano")[0].startswith("unet/model.onnx: ")
    assert verify(_bundle(tmp_path / "m", model, profile="my-board"))["ok"] is True  # no target, no parser check


def test_a_component_whose_file_is_missing_is_reported_once(tmp_path):
    root = _bundle(tmp_path)
    (root / "unet" / "model.onnx").unlink()
    assert _problems(root) == ["unet/model.onnx: missing"]
    root = _bundle(tmp_path / "o", extra={"components": {"vae_decoder": {"file": "vae_decoder/model.onnx"},
                                                         "unet": {"file": "unet/model.onnx"}}})
    assert verify(root)["ok"] is True  # a component not in the files table is not a finding of its own


def test_every_component_is_checked(tmp_path):
    root = _bundle(tmp_path)
    (root / "vae").mkdir()
    onnx.save(_edit(_model(), sparsity="0.9"), str(root / "vae" / "model.onnx"))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"]["vae/model.onnx"] = sha256_file(root / "vae" / "model.onnx")
    manifest["components"] = {"vae_decoder": {"file": "vae/model.onnx"}, "unet": {"file": "unet/model.onnx"}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    (problem,) = _problems(root)
    assert problem.startswith("vae/model.onnx: tinyprune.sparsity claims 0.900000")


def test_a_manifest_without_tables_has_nothing_to_match(tmp_path):
    root = _bundle(tmp_path)
    (root / MANIFEST).write_text(json.dumps({"profile": "x86-cpu"}))
    assert _problems(root) == ["report/report.md: not in the manifest", "unet/model.onnx: not in the manifest"]


def test_claims_of_weights_in_external_data_are_read_from_beside_the_file(tmp_path):
    root = _bundle(tmp_path)
    onnx.save(_edit(_model(), sparsity="0.9"), str(root / "unet" / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest))
    (problem,) = _problems(root)
    assert problem == f"unet/model.onnx: tinyprune.sparsity claims 0.900000, weights hold {(32 + 3) / 96:.6f}"


def test_components_after_a_missing_one_are_still_checked(tmp_path):
    root = _bundle(tmp_path, _edit(_model(), sparsity="0.9"))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["components"]["text_encoder"] = {"file": "text_encoder/model.onnx"}  # sorts first, has no file
    (root / MANIFEST).write_text(json.dumps(manifest))
    (problem,) = _problems(root)
    assert problem.startswith("unet/model.onnx: tinyprune.sparsity claims 0.900000")


def test_a_precision_the_file_does_not_have(tmp_path):
    """The manifest's precision of a component against its file's; the file's claim against its weights."""
    root = _bundle(tmp_path, extra={"components": {"unet": {"file": "unet/model.onnx", "precision": "int8"}}})
    assert _problems(root) == ["unet/model.onnx: the manifest says int8, the file fp32"]
    root = _bundle(tmp_path / "claim", _edit(_model(), precision="fp16"))
    assert _problems(root) == ["unet/model.onnx: tinyprune.precision claims fp16, the weights are fp32"]
