"""Every command through Typer's CliRunner: exit codes, messages, the bundle on disk."""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tinyprune.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_does_not_import_torch():
    code = "import sys; import cli; assert 'torch' not in sys.modules and 'onnx' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tinyprune.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "export" in proc.stdout


def test_profiles_list_and_show():
    r = invoke("profiles", "--json")
    assert r.exit_code == 0
    names = [p["name"] for p in json.loads(r.stdout)]
    assert len(names) == 9 and "jetson-orin-nano" in names
    r = invoke("profiles", "jetson", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "jetson-orin-nano"
    r = invoke("profiles", "nope")
    assert r.exit_code == 2 and "unknown target 'nope'" in r.stderr


def test_export_bundle_contents(bundle):
    out, result = bundle
    for rel in ("manifest.json", "unet/model.onnx", "vae_encoder/model.onnx", "vae_decoder/model.onnx",
                "report/report.json", "report/report.md", "report/timings.json", "pruned/model_index.json",
                "pruned/pruning_plan.json", "pruned/unet/diffusion_pytorch_model.safetensors"):
        assert (out / rel).is_file(), rel
    assert abs(result["sparsity"]["unet"] - 0.43) <= 0.005
    assert result["ok"] and all(d["max_abs"] <= d["tolerance"] for d in result["onnx_drift"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert "report/timings.json" not in manifest["files"]
    assert manifest["components"]["unet"]["inputs"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8],
                                                                  "max": [2, 4, 8, 8]}


def test_verify_ok_then_tampered(bundle, tmp_path):
    out, _ = bundle
    r = invoke("verify", out)
    assert r.exit_code == 0, r.stderr
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / "vae_decoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = invoke("verify", copy)
    assert r.exit_code == 1
    assert "vae_decoder/model.onnx: checksum mismatch" in r.stderr


def test_inspect_shows_sparsity(bundle):
    out, result = bundle
    r = invoke("inspect", out / "unet" / "model.onnx", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["sparsity"] == pytest.approx(result["sparsity"]["unet"], abs=1e-6)
    assert data["metadata"]["tinyprune.sparsity"] == f"{data['sparsity']:.6f}"
    assert data["problems"] == []
    r = invoke("inspect", out / "unet" / "model.onnx")
    assert "sparsity 0.4300" in r.stdout


def test_validate_passes_and_fails_on_gate(bundle, tiny_dir):
    from tinyprune.judge.checks import CHECKS, checks_run

    out, result = bundle
    r = invoke("validate", out, "--model", tiny_dir, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["failed"] == []
    # export and validate run the one check list (judge/checks.py), in its order; bench its latency budgets
    assert data["checks"] == result["checks"] == checks_run(("dense", "pruned", "bundle"))
    assert data["checks"] == ["onnx_drift", "image_drift", "runtime_drift", "quality"]
    assert [c.key for c in CHECKS] == data["checks"] + ["budgets"] and checks_run(("latency",)) == ["budgets"]
    assert [d["name"] for d in data["onnx_drift"]] == [d["name"] for d in result["onnx_drift"]]
    assert json.loads((out / "report" / "report.json").read_text())["checks"] == result["checks"]
    r = invoke("validate", out, "--model", tiny_dir, "--image-checks", 0, "--quality", 0, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    for d in [data["image_drift"], *data["runtime_drift"]]:  # skipped: no figures, no gate, the reason
        assert d["skipped"] is True and d["ok"] is True and d["psnr_db"] is None and d["reason"] == "--image-checks 0"
    assert data["checks"] == result["checks"] and data["quality"] is None
    r = invoke("validate", out, "--model", tiny_dir, "--image-checks", 0, "--quality", 0)
    assert r.exit_code == 0 and r.stdout.count("skipped (--image-checks") == 2  # the table wraps at 80 columns
    r = invoke("validate", out, "--model", tiny_dir, "--min-psnr", 200)
    assert r.exit_code == 1 and "gate failed: image dense vs pruned" in r.stderr
    r = invoke("validate", out)
    assert r.exit_code == 2 and "pass --model" in r.stderr


def test_export_gate_failure_still_writes_bundle(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--sparsity", "0.9", "--out", tmp_path / "b", "--min-psnr", 200)
    assert r.exit_code == 1
    assert "gate failed: " in r.stderr
    assert json.loads((tmp_path / "b" / "report" / "report.json").read_text())["ok"] is False


def test_existing_out_refused_without_force(bundle, tiny_dir):
    out, _ = bundle
    before = (out / "manifest.json").read_bytes()
    r = invoke("export", "--model", tiny_dir, "--out", out)
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("value, message", [
    ("abc", "--sparsity must be a number in [0, 1), got 'abc'"),
    ("-0.1", "--sparsity must be in [0, 1), got -0.1"),
    ("1.0", "--sparsity must be in [0, 1), got 1.0"),
    ("nan", "--sparsity must be in [0, 1), got nan"),
])
def test_bad_sparsity(tiny_dir, tmp_path, value, message):
    r = invoke("export", "--model", tiny_dir, "--sparsity", value, "--out", tmp_path / "b")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "b").exists()


def test_unknown_target_lists_known(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--target", "jetsn", "--out", tmp_path / "b")
    assert r.exit_code == 2
    assert "unknown target 'jetsn'; known targets:" in r.stderr and "jetson-agx-orin" in r.stderr


def test_two_four_refused_without_sparse_tensor_cores(tiny_dir, tmp_path):
    r = invoke("export", "--model", tiny_dir, "--target", "jetson-xavier-nx", "--pattern", "2:4", "--out", tmp_path / "b")
    assert r.exit_code == 2
    assert "target jetson-xavier-nx has none: use --pattern unstructured" in r.stderr


def _broken(tiny_dir, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    edit(bad)
    return bad


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("edit, message", [
    (lambda d: shutil.rmtree(d), "does not exist"),
    (lambda d: (d / "model_index.json").unlink(), "is not a diffusers pipeline: model_index.json is missing"),
    (lambda d: (d / "model_index.json").write_text("{\"vae\": 1}"), "model_index.json lists no 'unet' component"),
    (lambda d: shutil.rmtree(d / "unet"), "component dir 'unet/' is missing"),
    (lambda d: _truncate(d / "unet" / "config.json", 20), "unet/config.json is not valid JSON"),
    (lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors"), "weights could not be loaded, corrupt or truncated?"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").rename(d / "vae" / "diffusion_pytorch_model.bin"),
     "holds only pickle weights (diffusion_pytorch_model.bin); tinyprune loads safetensors only"),
])
def test_bad_model_dir(tiny_dir, tmp_path, edit, message):
    bad = _broken(tiny_dir, tmp_path, edit)
    r = invoke("export", "--model", bad, "--out", tmp_path / "out")
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "out").exists()


def test_model_is_a_file(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    r = invoke("export", "--model", f, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "is a file; --model expects a diffusers pipeline directory" in r.stderr


def test_prune_writes_reloadable_pipeline(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    r = invoke("prune", "--model", tiny_dir, "--sparsity", "0.3", "--scope", "layer", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet", use_safetensors=True)
    plan = json.loads((tmp_path / "p" / "pruning_plan.json").read_text())
    from tinyprune.prune.masks import prunable_weights

    for name, w in prunable_weights(unet).items():
        assert int((w == 0).sum()) == plan["components"]["unet"]["layers"][name]["zeros"]
        assert int((w == 0).sum()) >= round(0.3 * w.numel())
    from tinyprune.prune.plan import MaskedComponent, PrunePlan

    typed = PrunePlan.from_dict(plan)  # the on-disk plan reads back typed, and writes out unchanged
    u = typed.components["unet"]
    assert isinstance(u, MaskedComponent) and not typed.structured and u.dense_params() is None
    assert u.layers[name].zeros == plan["components"]["unet"]["layers"][name]["zeros"]
    assert u.layers[name].pattern is None  # no 2:4 selection ran
    assert typed.to_dict() == plan and PrunePlan.from_dict(typed.to_dict()) == typed
    assert typed.sparsity() == {"unet": round(u.sparsity, 6)}


def test_choices_are_the_values_the_code_validates():
    """The CLI's Enums list what config.py and bench/latency.py accept (plus --method auto), in their order."""
    import cli
    from tinyprune import config
    from tinyprune.bench.latency import BENCH_BACKENDS

    def values(enum):
        return tuple(m.value for m in enum)

    assert values(cli.Method) == config.METHODS + ("auto",)
    assert values(cli.Pattern) == config.PATTERNS and values(cli.Scope) == config.SCOPES
    assert values(cli.CostModel) == config.COST_MODELS and values(cli.RecoveryTarget) == config.RECOVERY_TARGETS
    assert values(cli.BenchBackend) == BENCH_BACKENDS
    assert set(cli.STRUCTURED_METHODS) <= set(values(cli.Method))
    for rule in cli.APPLIES.values():  # the applicability table names only real methods and patterns
        assert set(rule.methods) <= set(config.METHODS) and set(rule.not_patterns) <= set(config.PATTERNS)


def test_export_help_groups_options_in_panels():
    r = invoke("export", "--help")
    assert r.exit_code == 0
    titles = [line.strip("╭─╮ ") for line in r.stdout.splitlines() if line.startswith("╭")]
    assert titles == ["Options", "Input and target", "Method", "Recovery", "Structured", "Compute", "Gates", "Output"]
    r = invoke("prune", "--help")
    assert [line.strip("╭─╮ ") for line in r.stdout.splitlines() if line.startswith("╭")] == [
        "Options", "Input and target", "Method", "Recovery", "Structured", "Compute", "Output"]
    r = invoke("bench", "--help")
    assert r.exit_code == 0 and "<ort-cpu|ort-cuda|trt|torch" in r.stdout  # the choices, listed by --help


@pytest.mark.parametrize("command", ["export", "prune", "sweep"])
def test_unknown_method_is_a_usage_error(command, tmp_path):
    r = invoke(command, "--method", "bogus", "--out", tmp_path / "out")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: unknown --method 'bogus'; known methods: magnitude, l1-grad, diff-pruning, "
                                "ld-pruner, ecodiff, auto")
    assert not (tmp_path / "out").exists()


def test_unknown_cost_model_and_backend_are_usage_errors(tmp_path):
    r = invoke("prune", "--method", "ecodiff", "--latency-aware", "--cost-model", "fast", "--out", tmp_path / "out")
    assert r.exit_code == 2 and r.stderr.strip() == "error: unknown --cost-model 'fast'; known: ort, macs"
    r = invoke("bench", tmp_path, "--backend", "onnx")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: unknown backend 'onnx'; known: ort-cpu, ort-cuda, trt, torch, torch-cuda"


def test_sweep_refuses_existing_out_before_any_work(tiny_dir, tmp_path, monkeypatch):
    import time

    def no_work(*args, **kwargs):
        raise AssertionError("sweep loaded the pipeline before checking --out")

    monkeypatch.setattr("tinyprune.workflows.sweep.load_pipeline", no_work)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    t0 = time.monotonic()
    r = invoke("sweep", "--model", tiny_dir, "--sparsity", "0.2,0.4", "--out", out)
    assert time.monotonic() - t0 < 2.0
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {out} already exists; pass --force to replace it"
    assert (out / "sweep.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_run_prints_to_dict_results(monkeypatch, tmp_path):
    """Results that are frozen dataclasses reach --json and the show functions as their to_dict(), also the
    result a GateFailed carries."""
    from dataclasses import dataclass

    from tinyprune.errors import GateFailed

    @dataclass(frozen=True)
    class Pruned:
        out: str
        unet: float

        def to_dict(self) -> dict:
            return {"out": self.out, "sparsity": {"unet": self.unet}}

    monkeypatch.setattr("tinyprune.workflows.export.prune_to_dir", lambda *a, **k: Pruned("p", 0.25))
    r = invoke("prune", "--json", "--out", tmp_path / "p")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"out": "p", "sparsity": {"unet": 0.25}}
    r = invoke("prune", "--out", tmp_path / "p")
    assert r.exit_code == 0 and r.stdout.strip() == "pruned pipeline written to p: sparsity unet 0.2500"

    def gate_fails(*args, **kwargs):
        raise GateFailed("gate failed: x", Pruned("q", 0.5))

    monkeypatch.setattr("tinyprune.workflows.export.prune_to_dir", gate_fails)
    r = invoke("prune", "--json", "--out", tmp_path / "q")
    assert r.exit_code == 1 and json.loads(r.stdout) == {"out": "q", "sparsity": {"unet": 0.5}}
    assert r.stderr.strip() == "error: gate failed: x"
