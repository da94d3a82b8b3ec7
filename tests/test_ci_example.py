"""The example CI workflow (examples/ci/github-workflow.yml) runs examples/ci/export.sh; this runs the same
script with the workflow's own environment, on the tiny pipeline, and checks what CI would see."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with huggingface_hub (a diffusers dependency)
    return yaml.safe_load((CI / "github-workflow.yml").read_text())


def _export_step(wf: dict) -> dict:
    steps = [s for s in wf["jobs"]["bundles"]["steps"] if "export.sh" in s.get("run", "")]
    assert len(steps) == 1
    return steps[0]


def test_workflow_shape():
    wf = _workflow()
    steps = wf["jobs"]["bundles"]["steps"]
    step = _export_step(wf)
    assert step["run"].strip() == "bash examples/ci/export.sh"
    assert step["env"]["TARGETS"].split() == ["jetson", "jetson-xavier-nx"]
    install = next(s for s in steps if s.get("name", "").startswith("Install"))
    assert "pip install ." in install["run"]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"  # a failed gate still uploads the bundles for inspection
    assert upload["with"]["path"].rstrip("/") == step["env"]["OUT"]
    assert steps.index(upload) > steps.index(step)


def _run_script(wf: dict, tiny_dir, out: Path, extra: str, **override) -> subprocess.CompletedProcess:
    env = {k: str(v) for k, v in _export_step(wf)["env"].items()}
    env.update(MODEL=str(tiny_dir), OUT=str(out), TINYPRUNE=f"{sys.executable} -m tinyprune.cli", EXTRA=extra, **override)
    return subprocess.run(["bash", str(CI / "export.sh")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env))


def test_script_exports_and_verifies_two_targets(tiny_dir, tmp_path):
    wf = _workflow()
    out = tmp_path / "bundles"
    r = _run_script(wf, tiny_dir, out, "--image-checks 1 --image-steps 2")
    assert r.returncode == 0, r.stderr
    assert "tinyprune-ci: jetson: exit 0" in r.stdout and "tinyprune-ci: jetson-xavier-nx: exit 0" in r.stdout
    orin = json.loads((out / "jetson.json").read_text())
    xavier = json.loads((out / "jetson-xavier-nx.json").read_text())
    assert orin["profile"] == "jetson-orin-nano" and orin["pattern"] == "2:4" and orin["ok"]
    assert xavier["profile"] == "jetson-xavier-nx" and xavier["pattern"] == "unstructured" and xavier["ok"]
    for target in ("jetson", "jetson-xavier-nx"):
        assert (out / target / "manifest.json").is_file() and (out / target / "unet" / "model.onnx").is_file()


def test_script_fails_on_gate_but_keeps_bundles(tiny_dir, tmp_path):
    wf = _workflow()
    out = tmp_path / "bundles"
    # unstructured targets here (the 2:4 one is in the test above, and its calibration costs time)
    r = _run_script(wf, tiny_dir, out, "--image-checks 1 --image-steps 2 --min-psnr 200",
                    TARGETS="jetson-xavier-nx x86-cpu")
    assert r.returncode == 1
    assert "tinyprune-ci: jetson-xavier-nx: exit 1" in r.stdout and "tinyprune-ci: x86-cpu: exit 1" in r.stdout
    assert r.stderr.count("error: gate failed: image dense vs pruned") == 2
    for target in ("jetson-xavier-nx", "x86-cpu"):
        result = json.loads((out / f"{target}.json").read_text())
        assert result["ok"] is False and (out / target / "report" / "report.md").is_file()


def test_script_bad_target_exits_2(tiny_dir, tmp_path):
    wf = _workflow()
    env_out = tmp_path / "bundles"
    r = subprocess.run(["bash", str(CI / "export.sh")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, MODEL=str(tiny_dir), OUT=str(env_out), TARGETS="jetsn",
                                TINYPRUNE=f"{sys.executable} -m tinyprune.cli"))
    assert _export_step(wf)["env"]["TARGETS"]  # the workflow names its targets explicitly
    assert r.returncode == 2 and "tinyprune-ci: jetsn: exit 2" in r.stdout
    assert "error: unknown target 'jetsn'; known targets:" in r.stderr


def test_workflow_runs_a_bundle_in_diffusers_onnx_pipeline(family_dirs, tmp_path):
    """The workflow's step after export: examples/ci/onnx_pipeline.py on the first target's bundle; a Stable
    Diffusion pipeline's bundle makes an image in OnnxStableDiffusionPipeline, the demo's is skipped."""
    wf = _workflow()
    steps = wf["jobs"]["bundles"]["steps"]
    (step,) = [s for s in steps if "onnx_pipeline.py" in s.get("run", "")]
    assert steps.index(_export_step(wf)) < steps.index(step)
    out = tmp_path / "bundles"
    r = _run_script(wf, family_dirs["sd"], out, "--image-checks 1 --image-steps 2", TARGETS="jetson x86-cpu")
    assert r.returncode == 0, r.stderr
    bundles = _export_step(wf)["env"]["OUT"]
    python, script, *argv = shlex.split(step["run"])  # the step as the workflow has it, bundles/ -> out
    argv = [str(out / a[len(bundles) + 1:]) if a.startswith(bundles + "/") else a for a in argv]
    assert script == "examples/ci/onnx_pipeline.py" and argv[0] == str(out / "jetson")
    r = subprocess.run([sys.executable, script, *argv, "--steps", "2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OnnxStableDiffusionPipeline ran" in r.stdout and (out / "jetson-onnx.png").stat().st_size > 100


def test_onnx_pipeline_step_skips_a_bundle_diffusers_cannot_run(family_bundle):
    out, _ = family_bundle("ddpm")
    r = subprocess.run([sys.executable, str(CI / "onnx_pipeline.py"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "skipped" in r.stdout
