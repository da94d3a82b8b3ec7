"""Quality gates wired into export / validate / sweep, on the tiny random pipeline (so the figures are poor
and the accuracy gate fails: that is the failing path, with exact messages)."""

import json
import math
from dataclasses import replace

from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.judge.gates import QualityResult

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _result(pruned_fd, pruned_acc):
    return QualityResult(n_samples=100, dense_fd=10.0, pruned_fd=pruned_fd, dense_accuracy=0.98,
                         pruned_accuracy=pruned_acc, psnr_db=math.inf, ssim=1.0, max_fd_ratio=1.1, min_accuracy=0.9)


def test_quality_result_gates():
    assert _result(11.0, 0.95) and _result(11.0, 0.95).fd_ratio == 1.1
    assert _result(11.5, 0.95).failures() == ["FD ratio 1.150 > 1.1"]
    assert _result(10.0, 0.85).failures() == ["class accuracy 0.850 < 0.9"]
    assert not _result(12.0, 0.5)
    assert _result(10.0, 0.95).to_dict()["psnr_db"] is None  # infinite: JSON null, never a string
    assert replace(_result(10.0, 0.95), dense_fd=0.0).to_dict()["fd_ratio"] is None


def test_skipped_image_check_is_a_typed_result():
    from tinyprune.judge.drift import ImageDrift

    d = ImageDrift.skip("image dense vs pruned", 14.0, "--image-checks 0")
    assert d and d.skipped and d.psnr_db is None and d.max_abs is None and d.reason == "--image-checks 0"
    assert d.failures() == []
    assert d.to_dict() == {"name": "image dense vs pruned", "psnr_db": None, "max_abs": None, "min_psnr_db": 14.0,
                           "ok": True, "skipped": True, "reason": "--image-checks 0"}
    ran = ImageDrift("image dense vs pruned", 12.0, 0.5, 14.0)
    assert not ran and not ran.skipped and ran.failures() == ["image dense vs pruned"]
    assert ran.to_dict()["skipped"] is False and ran.to_dict()["reason"] is None


def test_verdict_names_the_failed_gates_in_check_order():
    from tinyprune.judge.checks import Checked, verdict
    from tinyprune.judge.drift import Drift, ImageDrift
    from tinyprune.judge.gates import LatencyBudget

    checked = Checked({"onnx_drift": (Drift("unet.out_sample (batch 2)", 1.0, 0.1, 1.0, 1e-3),),
                       "image_drift": (ImageDrift.skip("image dense vs pruned", 14.0, "--image-checks 0"),),
                       "quality": (_result(10.0, 0.85),)})
    assert checked.verdict.failed == ("unet.out_sample (batch 2)", "class accuracy 0.850 < 0.9")
    assert checked.verdict.message() == "gate failed: unet.out_sample (batch 2), class accuracy 0.850 < 0.9"
    d = checked.to_dict()
    assert d["checks"] == ["onnx_drift", "image_drift", "quality"] and d["ok"] is False
    assert d["failed"] == list(checked.verdict.failed) and d["image_drift"]["skipped"] is True
    assert verdict([LatencyBudget("unet", 1.0, 0.5)]) and not verdict([LatencyBudget("unet", 1.0, 2.0)])
    assert verdict([LatencyBudget("unet", 1.0, 2.0)]).failed == ("unet p50 2 ms > 1 ms",)


def test_export_quality_opt_in_on_other_pipelines(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--out", tmp_path / "b", "--quality", 1, "--image-checks", 2,
               "--max-fd-ratio", 100, "--json")
    assert r.exit_code == 1
    assert "gate failed: class accuracy" in r.stderr and "< 0.85" in r.stderr
    report = json.loads((tmp_path / "b" / "report" / "report.json").read_text())
    q = report["quality"]
    assert q["n_samples"] == 10 and q["ok"] is False and q["fd_ratio"] <= 100
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "report/grid.png" in manifest["files"]
    from PIL import Image

    assert Image.open(tmp_path / "b" / "report" / "grid.png").size[0] > Image.open(tmp_path / "b" / "report" / "grid.png").size[1]
    assert "## Quality (digit yardstick, 10 samples each" in (tmp_path / "b" / "report" / "report.md").read_text()


def test_quality_off_by_default_for_other_pipelines(bundle):
    _, result = bundle
    assert result["quality"] is None


def test_sweep_table_json_plot(tiny_dir, tmp_path):
    r = invoke("sweep", "--model", tiny_dir, "--sparsity", "0.5,0.2", "--quality", 1, "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [row["sparsity"] for row in data["rows"]] == [0.2, 0.5]
    assert [round(row["achieved"], 3) for row in data["rows"]] == [0.2, 0.5]
    assert data["n_samples"] == 10
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"] == data["rows"]
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["seed"] == 1000
    r2 = invoke("sweep", "--model", tiny_dir, "--sparsity", "0.5", "--quality", 1, "--seed", 7,
                "--out", tmp_path / "s7", "--json")
    other = json.loads(r2.stdout)
    assert other["seed"] == 7 and other["rows"][0]["achieved"] == data["rows"][1]["achieved"]
    assert other["rows"][0]["dense_fd"] != data["rows"][1]["dense_fd"]  # other noise, other samples


def test_sweep_bad_list(tiny_dir, tmp_path):
    r = invoke("sweep", "--model", tiny_dir, "--sparsity", "0.2,1.5", "--out", tmp_path / "s")
    assert r.exit_code == 2 and r.stderr.strip().endswith("error: --sparsity must be in [0, 1), got 1.5")
    assert not (tmp_path / "s").exists()


def test_sweep_methods_by_speedup_timed_with_pareto_front(tiny_dir, tmp_path, monkeypatch):
    """A speed-up sweep: the structured method prunes to each speed-up and every point, the zero-making method's too,
    is timed against the dense UNet; the front flags and pareto.png follow from the rows."""
    from tinyprune.model import calibration
    from tinyprune.workflows.sweep import pareto

    # the structured defaults (2000 distillation steps on 200 latents) are minutes even here: fewer, still > 0
    monkeypatch.setattr("tinyprune.config.DEFAULT_STRUCTURED_RECOVERY_STEPS", 30)
    monkeypatch.setattr("tinyprune.config.STRUCTURED_CALIBRATION_SAMPLES", 24)
    counts, drawn = [], calibration.from_samples

    def from_samples(*args, **kwargs):
        counts.append(kwargs.get("n"))
        return drawn(*args, **kwargs)

    monkeypatch.setattr(calibration, "from_samples", from_samples)

    r = invoke("sweep", "--model", tiny_dir, "--method", "magnitude,ld-pruner", "--speedup", "1.5",
               "--target", "x86-cpu", "--quality", 1, "--out", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    rows = data["rows"]
    assert [(row["method"], row["target"], row["speedup_asked"]) for row in rows] == [
        ("magnitude", "sparsity", None), ("ld-pruner", "speedup", 1.5)]
    assert rows[0]["sparsity"] == 0.43 and round(rows[0]["achieved"], 3) == 0.43  # the zero-making method at export's default
    assert rows[1]["pattern"] == "channel" and 0 < rows[1]["achieved"] < 1
    for row in rows:  # measured here, both sides interleaved
        assert row["p50_ms"] > 0 and row["dense_p50_ms"] > 0
        assert row["speedup"] == round(row["dense_p50_ms"] / row["p50_ms"], 3)
    assert rows[1]["speedup_predicted"] is not None  # the structured point's plan holds the cost table's prediction
    assert counts == [24]  # magnitude reads no calibration; ld-pruner the structured methods' default count
    assert [row["pareto_fd"] for row in rows] == pareto(rows, "fd_ratio", "lower")
    assert [row["pareto_accuracy"] for row in rows] == pareto(rows, "accuracy", "higher")
    assert data["speed"]["backend"] == "ort-cpu" and data["speed"]["batch"] == 2
    for name in ("sweep.png", "pareto.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    from tinyprune.workflows.sweep import pareto

    rows = [{"speedup": 1.0, "fd_ratio": 1.05, "accuracy": 0.95},  # front: the best quality
            {"speedup": 1.5, "fd_ratio": 1.10, "accuracy": 0.90},  # front: faster than the first, worse than it
            {"speedup": 1.4, "fd_ratio": 1.20, "accuracy": 0.90},  # beaten by the second on both
            {"speedup": 2.0, "fd_ratio": 1.10, "accuracy": 0.80},  # beats the second on FD: faster, as good
            {"speedup": 2.0, "fd_ratio": 1.10, "accuracy": 0.80}]  # an equal twin beats neither
    assert pareto(rows, "fd_ratio", "lower") == [True, False, False, True, True]
    assert pareto(rows, "accuracy", "higher") == [True, True, False, True, True]


def test_sweep_refusals_before_any_work(tiny_dir, tmp_path):
    for args, line in (
            (("--speedup", "1,2"), "error: --speedup must be a number > 1, got 1"),
            (("--method", "magnitude,nope"), "error: unknown --method 'nope'; known methods:"),
            (("--method", ","), "error: --method needs a comma-separated list"),
            (("--pattern", "2:4", "--target", "x86-cpu"), "error: pattern 2:4 needs sparse tensor cores")):
        r = invoke("sweep", "--model", tiny_dir, *args, "--out", tmp_path / "s")
        assert r.exit_code == 2, (args, r.stderr)
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(line), (args, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "s").exists()
