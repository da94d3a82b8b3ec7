"""Every export gate driven just past its threshold, and just inside it.

One export of the tiny pipeline with gates that cannot fail measures each figure (ONNX drift per component, runtime vs
PyTorch image, dense vs pruned image, FD ratio, class accuracy); the export is deterministic, so the same command
under a profile whose thresholds sit a hair on either side of those figures must pass (all inside) or fail with the
gate named in the one-line error, exit 1, the bundle still written and report.json listing exactly that gate."""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import pytest
from typer.testing import CliRunner

from tinyprune.cli import app

FLAGS = ("--image-checks", "1", "--image-steps", "2", "--quality", "1")
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
LENIENT = {"tolerance": {c: 1.0 for c in COMPONENTS},
           "gates": {"min_image_psnr_db": 0.0, "max_fd_ratio": 1e6, "min_accuracy": 0.0, "min_runtime_psnr_db": 0.0}}


def profile(path, tolerance: dict, gates: dict):
    """x86-cpu's profile with its [tolerance] and [gates] tables replaced."""
    text = resources.files("tinyprune.profiles").joinpath("x86-cpu.toml").read_text()
    for table, values in (("tolerance", tolerance), ("gates", gates)):
        body = "".join(f"{k} = {v!r}\n" for k, v in values.items())
        text = re.sub(rf"\[{table}\][^\n]*\n(?:[^\[\n][^\n]*\n|\n)*", f"[{table}]\n{body}\n", text)
    path.write_text(text.replace('name = "x86-cpu"', f'name = "{path.stem}"'))
    return path


def export(tiny_dir, tmp_path, name: str, tolerance: dict, gates: dict):
    out = tmp_path / name
    target = profile(tmp_path / f"{name}.toml", tolerance, gates)
    r = CliRunner().invoke(app, ["export", "--model", str(tiny_dir), "--target", str(target), "--out", str(out),
                                 *FLAGS])
    report = out / "report" / "report.json"
    return r, out, json.loads(report.read_text()) if report.is_file() else None


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gates")
    r, _, report = export(tiny_dir, tmp, "lenient", **LENIENT)
    assert r.exit_code == 0, r.stderr
    drift = {c: max(d["max_abs"] for d in report["onnx_drift"] if d["name"].startswith(c + ".")) for c in COMPONENTS}
    (runtime,) = report["runtime_drift"]
    image = report["image_drift"]
    q = report["quality"]
    figures = {"drift": drift, "runtime_psnr": runtime["psnr_db"], "image_psnr": image["psnr_db"],
               "fd_ratio": q["fd_ratio"], "accuracy": q["pruned"]["accuracy"]}
    assert all(v > 0 for v in drift.values()), drift  # a zero drift could not be gated below
    assert all(math.isfinite(figures[k]) for k in ("runtime_psnr", "image_psnr", "fd_ratio")), figures
    return tmp, figures


def inside(f: dict) -> dict:
    return {"tolerance": {c: d * 1.01 for c, d in f["drift"].items()},
            "gates": {"min_image_psnr_db": f["image_psnr"] - 0.01, "max_fd_ratio": f["fd_ratio"] * 1.001,
                      "min_accuracy": f["accuracy"], "min_runtime_psnr_db": f["runtime_psnr"] - 0.01}}


def test_just_inside_every_threshold_passes(tiny_dir, measured):
    tmp, f = measured
    r, out, report = export(tiny_dir, tmp, "inside", **inside(f))
    assert r.exit_code == 0, r.stderr
    assert report["ok"] is True and report["failed"] == []
    assert report["checks"] == ["onnx_drift", "image_drift", "runtime_drift", "quality"]


def _past(f: dict, gate: str) -> tuple[dict, str, list[str]]:
    """The inside profile with one gate moved just past its figure; the failures report.json must list."""
    p = inside(f)
    if gate == "onnx drift":
        p["tolerance"] = {c: d * 0.99 for c, d in f["drift"].items()}
        return p, "", []  # names checked below: every component's worst output
    if gate == "runtime image":
        p["gates"]["min_runtime_psnr_db"] = f["runtime_psnr"] + 0.01
        return p, "image runtime (ort-cpu) vs PyTorch, pruned", ["image runtime (ort-cpu) vs PyTorch, pruned"]
    if gate == "dense vs pruned image":
        p["gates"]["min_image_psnr_db"] = f["image_psnr"] + 0.01
        return p, "image dense vs pruned", ["image dense vs pruned"]
    if gate == "fd ratio":
        limit = f["fd_ratio"] * 0.999
        p["gates"]["max_fd_ratio"] = limit
        msg = f"FD ratio {f['fd_ratio']:.3f} > {limit:g}"
        return p, msg, [msg]
    limit = f["accuracy"] + 0.01
    p["gates"]["min_accuracy"] = limit
    msg = f"class accuracy {f['accuracy']:.3f} < {limit:g}"
    return p, msg, [msg]


@pytest.mark.parametrize("gate", ["onnx drift", "runtime image", "dense vs pruned image", "fd ratio", "accuracy"])
def test_just_past_one_threshold_fails_that_gate(tiny_dir, measured, gate):
    tmp, f = measured
    p, name, failed = _past(f, gate)
    r, out, report = export(tiny_dir, tmp, gate.replace(" ", "-"), **p)
    assert r.exit_code == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert errors[0].startswith("error: gate failed: ") and errors[0].endswith(
        f"(bundle written to {out}; see report/report.md)")
    assert report["ok"] is False
    if gate == "onnx drift":
        worst = {c: max((d for d in report["onnx_drift"] if d["name"].startswith(c + ".")), key=lambda d: d["max_abs"])
                 for c in COMPONENTS}
        assert {w["name"] for w in worst.values()} <= set(report["failed"])
        assert all(d["ok"] is False for d in worst.values())
        assert all(name.split(".")[0] in COMPONENTS for name in report["failed"])
    else:
        assert report["failed"] == failed
        assert name in errors[0]
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0  # written whole, checksums and all
