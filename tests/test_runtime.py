"""The torch-free runtime: numpy schedulers against diffusers', the generation loop against PyTorch's, and a
subprocess where torch and diffusers cannot be imported at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blocking import DEVICE_LACKS, blocked_imports
from tinyprune.cli import app
from tinyprune.judge.drift import psnr
from tinyprune.runtime.schedulers import DDIM, Euler, make_scheduler, torch_linspace
from tinyprune.model.families.text import shipped_prompts

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Scheduler configs: the demo/tiny one (cosine, leading, offset 1, no alpha-to-one), SD-1.5's (scaled_linear,
# leading, offset 1), and a linear/trailing/linspace one.
CONFIGS = [
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
         steps_offset=1, timestep_spacing="leading"),
    dict(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing"),
    dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace"),
]


def _close(ref: np.ndarray, got: np.ndarray, inp: np.ndarray | None = None) -> float:
    """Largest difference relative to max(1, |ref|, |input|) elementwise. Not 0: torch's x ** 0.5 (SLEEF pow,
    1 ulp) is not correctly rounded while numpy's is, so scalars like sqrt(alpha_cumprod) or sigma can differ in
    the last bit; and Euler's step cancels (x - (x - sigma * eps)) / sigma, so the input's size is the yardstick."""
    scale = np.maximum(1.0, np.abs(ref))
    if inp is not None:
        scale = np.maximum(scale, np.abs(inp))
    return float((np.abs(ref.astype(np.float64) - got) / scale).max())


def test_torch_linspace_and_cumprod_bit_exact():
    torch = pytest.importorskip("torch")
    for start, end, n in ((0.0001, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (0.1, 0.9, 7)):
        assert np.array_equal(torch_linspace(start, end, n), torch.linspace(start, end, n).numpy())
    from diffusers import DDIMScheduler

    for cfg in CONFIGS:
        ref = DDIMScheduler(**cfg)
        assert np.array_equal(DDIM(dict(ref.config)).alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["cosine-leading", "sd15-scaled-linear", "linear-trailing", "linear-linspace"])
def test_numpy_scheduler_matches_diffusers(kind, cfg):
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = DDIMScheduler if kind == "ddim" else EulerDiscreteScheduler
    # As the runtime gets it: the DDIM config as saved in the bundle, every key explicit (a config made in memory
    # lists its defaults in _use_default_values, and from_config would give Euler its own defaults for those).
    saved = {k: v for k, v in DDIMScheduler(**cfg).config.items() if k != "_use_default_values"}
    ref = cls.from_config(saved)
    mine = make_scheduler(saved, kind)
    assert isinstance(mine, DDIM if kind == "ddim" else Euler)
    for steps in (7, 20):
        ref.set_timesteps(steps)
        assert np.array_equal(mine.set_timesteps(steps), ref.timesteps.numpy())
        assert float(mine.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        if kind == "euler":
            assert _close(ref.sigmas.numpy(), mine.sigmas) <= 1e-6
        rng = np.random.default_rng(steps)
        for i, t in enumerate(ref.timesteps):  # every step, from fresh inputs so that errors do not compound
            x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * np.float32(mine.init_noise_sigma if i == 0 else 1)
            eps = rng.standard_normal(x.shape).astype(np.float32)
            scaled = ref.scale_model_input(torch.from_numpy(x), t).numpy()
            assert _close(scaled, mine.scale_model_input(x, i)) <= 1e-6
            prev = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
            got = mine.step(eps, i, x)
            assert got.dtype == np.float32 and got.shape == x.shape
            assert _close(prev, got, x) <= 1e-6, (kind, steps, i)


def test_karras_timesteps_follow_diffusers():
    pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 use_karras_sigmas=True)
    mine = Euler(dict(ref.config))
    ref.set_timesteps(12)
    np.testing.assert_allclose(mine.set_timesteps(12), ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(mine.sigmas, ref.sigmas.numpy(), rtol=1e-6)


def test_unsupported_scheduler_options_refused():
    from tinyprune.errors import InputError

    with pytest.raises(InputError, match="thresholding"):
        DDIM({"thresholding": True})
    with pytest.raises(InputError, match="beta_schedule"):
        DDIM({"beta_schedule": "sigmoid"})
    with pytest.raises(InputError, match="unknown scheduler 'heun'"):
        make_scheduler({}, "heun")


def test_initial_noise_is_the_pipelines():
    from tinyprune.runtime.generate import initial_noise
    from tinyprune.model.sampling import initial_noise as torch_side

    assert np.array_equal(initial_noise(7, 3, 4, 8), torch_side(7, 3, 4, 8))


def test_bundle_carries_runtime_files(bundle):
    out, _ = bundle
    rt = out / "runtime"
    shapes = json.loads((rt / "shapes.json").read_text())
    assert shapes == {"latent_channels": 4, "latent_size": 8, "vae_scale": 4, "image_size": 32, "image_channels": 3,
                      "scaling_factor": 0.18215, "family": "stable-diffusion", "decoder": "vae_decoder",
                      "conditioning": {"kind": "text", "guided": True, "null": "empty", "guidance": 7.5,
                                       "example_prompts": shipped_prompts()[:2],
                                       "encoders": [{"component": "text_encoder", "tokenizer": "tokenizer.json",
                                                     "context": "last_hidden_state", "pooled": None}]}}
    sched = json.loads((rt / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "squaredcos_cap_v2"
    readme = (rt / "README.md").read_text()
    assert "pip install onnxruntime numpy pillow tokenizers" in readme
    assert 'python -m tinyprune.runtime .. --prompt "a red bicycle" --steps 20 --seed 0 --out imgs' in readme
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in ("runtime/tokenizer.json", "runtime/shapes.json", "runtime/tinyprune/runtime/generate.py",
                "runtime/tinyprune/runtime/schedulers.py"):
        assert rel in manifest["files"], rel
    assert not (rt / "conditioning.npz").exists()
    source = ROOT / "exporter" / "runtime"
    copied = {p.relative_to(rt / "tinyprune" / "runtime") for p in (rt / "tinyprune" / "runtime").rglob("*.py")}
    assert copied == {p.relative_to(source) for p in source.rglob("*.py")}
    for rel in copied:
        assert (rt / "tinyprune" / "runtime" / rel).read_bytes() == (source / rel).read_bytes()


def test_runtime_package_is_import_closed():
    """The bundle copies runtime/ whole: nothing in it may import the rest of tinyprune, torch or diffusers."""
    import ast

    for path in (ROOT / "exporter" / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert node.level == 1 or not mod.startswith("tinyprune"), f"{path.name} imports {mod}"
                assert node.level <= 1, f"{path.name} imports outside the runtime package"
                assert mod.split(".")[0] not in ("torch", "diffusers", "transformers"), f"{path.name}: {mod}"
            elif isinstance(node, ast.Import):
                # trt.py alone takes torch, lazily, for CUDA buffers of --backend trt (a GPU machine has it)
                allowed = {"torch"} if path.name == "trt.py" else set()
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top not in {"tinyprune", "torch", "diffusers", "transformers"} - allowed, \
                        f"{path.name} imports {alias.name}"


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """The device: neither torch nor diffusers, transformers, onnx, typer or rich importable."""
    return blocked_imports(tmp_path_factory.mktemp("notorch"), DEVICE_LACKS + ("typer", "rich"))


PROMPTS = ["a red bicycle", "the digit 7", "", "number seven on black"]
NAMES = ["a-red-bicycle", "the-digit-7", "empty", "number-seven-on-black"]


def test_runtime_runs_without_torch_and_matches_pytorch(bundle, no_torch_env, tmp_path):
    out, _ = bundle
    env, log = no_torch_env
    # the PyTorch reference's guidance (tinyprune.model.sampling's 3.0), not the bundle's default 7.5
    args = [str(out)] + [a for c in PROMPTS for a in ("--prompt", c)] + ["--guidance", "3", "--steps", "10", "--seed",
                                                                         "0", "--npy", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "tinyprune.runtime", *args, "--out", str(tmp_path / "a")],
                          cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists(), f"the runtime tried to import: {log.read_text()}"
    result = json.loads(proc.stdout)
    assert result["scheduler"] == "ddim" and result["image_size"] == [32, 32]
    from PIL import Image

    pngs = [np.asarray(Image.open(f)) for f in result["files"]]
    assert [Path(f).name for f in result["files"]] == [f"{i:02d}_{n}_seed0.png" for i, n in enumerate(NAMES)]
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in pngs)

    # The same images as the PyTorch pipeline (tinyprune.model.sampling.sample: same seed, prompts, noise, DDIM).
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.model.sampling import sample

    ref = sample(load_pipeline(out / "pruned"), PROMPTS, seed=0, steps=10).numpy()
    got = np.load(tmp_path / "a" / "images.npy")
    assert got.shape == ref.shape == (4, 3, 32, 32)
    assert psnr(ref, got, 1.0) > 40
    ref8 = (ref.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    assert psnr(ref8, np.stack(pngs), 255.0) > 40

    # The bundle's own copy of the runtime, run as its README says, from BUNDLE/runtime: the same bytes.
    check = "import sys, tinyprune.runtime as r; assert r.__file__.startswith(sys.argv[1]), r.__file__"
    proc = subprocess.run([sys.executable, "-c", check, str(out / "runtime")], cwd=out / "runtime", env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tinyprune.runtime", *args, "--out", str(tmp_path / "b")],
                          cwd=out / "runtime", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists()
    for f in result["files"]:
        assert (tmp_path / "b" / Path(f).name).read_bytes() == Path(f).read_bytes()


def test_euler_runtime_matches_diffusers_loop(bundle):
    """Euler in numpy vs EulerDiscreteScheduler driving the PyTorch UNet and VAE, same noise and guidance."""
    torch = pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.runtime.generate import Runtime, initial_noise

    out, _ = bundle
    pipe = load_pipeline(out / "pruned")
    prompts, steps, g = ["the digit 2", "a handwritten five"], 6, 3.0
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    tok = pipe.parts["tokenizer"]
    with torch.inference_mode():
        lat = torch.from_numpy(initial_noise(0, 2, 4, 8)) * sched.init_noise_sigma
        ids = tok(["", ""] + prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        ctx = pipe.parts["text_encoder"](ids).last_hidden_state
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([lat, lat]), t)
            eu, ec = pipe.unet(x, t, encoder_hidden_states=ctx).sample.chunk(2)
            lat = sched.step(eu + g * (ec - eu), t, lat).prev_sample
        ref = (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1).numpy()
    with Runtime(out) as rt:
        got = rt.generate(prompts, seed=0, steps=steps, scheduler="euler", guidance=g)
    assert psnr(ref, got, 1.0) > 40


def _generate(out, tmp, *extra):
    return runner.invoke(app, ["generate", str(out), "--prompt", "the digit 3", "--prompt", "a handwritten seven",
                               "--steps", "5", "--out", str(tmp), *map(str, extra)], catch_exceptions=False)


def test_generate_same_seed_same_bytes(bundle, tmp_path):
    out, _ = bundle
    r1, r2 = _generate(out, tmp_path / "a", "--seed", 5), _generate(out, tmp_path / "b", "--seed", 5)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr
    names = ["00_the-digit-3_seed5.png", "01_a-handwritten-seven_seed5.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert "step 5/5" in r1.stderr  # not a TTY: one line per step
    r3 = _generate(out, tmp_path / "c", "--seed", 6, "--json")
    assert r3.exit_code == 0
    assert json.loads(r3.stdout)["files"][0].endswith("00_the-digit-3_seed6.png")
    assert (tmp_path / "c" / "00_the-digit-3_seed6.png").read_bytes() != (tmp_path / "a" / names[0]).read_bytes()


def test_generate_errors(bundle, tmp_path):
    out, _ = bundle
    r = _generate(out, tmp_path / "x", "--num-images", 0)
    assert r.exit_code == 2 and "--num-images must be >= 1, got 0" in r.stderr
    r = _generate(out, tmp_path / "x", "--scheduler", "heun")
    assert r.exit_code == 2 and "unknown scheduler 'heun'" in r.stderr
    r = _generate(tmp_path / "nope", tmp_path / "x")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        r = _generate(out, tmp_path / "x", "--backend", "trt")
        assert r.exit_code == 3 and "tensorrt is not installed" in r.stderr
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        r = _generate(out, tmp_path / "x", "--backend", "ort-cuda")
        assert r.exit_code == 3 and "CUDAExecutionProvider" in r.stderr


def test_export_reports_runtime_drift(bundle):
    out, result = bundle
    (d,) = result["runtime_drift"]
    assert d["name"] == "image runtime (ort-cpu) vs PyTorch, pruned"
    assert d["ok"] and (d["psnr_db"] is None or d["psnr_db"] > 40) and d["max_abs"] < 1e-3  # None: infinite
    assert d["min_psnr_db"] == 30.0  # the profile's default gate
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["runtime_drift"] == result["runtime_drift"]
    assert "Torch-free runtime vs PyTorch" in (out / "report" / "report.md").read_text()


def test_runtime_check_runs_one_guided_condition_per_unet_call(bundle, tiny_dir, monkeypatch):
    """Four conditions, UNet batches of 2 (a condition and its unguided twin: the memory of one image at a time), and
    the same images as the whole batch at once."""
    from tinyprune.config import load_profile
    from tinyprune.judge import runtime_check as rc
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.model.sampling import DEFAULT_GUIDANCE
    from tinyprune.runtime.generate import Runtime

    out, _ = bundle
    ref = rc.torch_e2e_reference(load_pipeline(out / "pruned"), steps=4)
    assert len(ref.conditions) == rc.E2E_LABELS == 4
    batches, enter = [], Runtime.__enter__

    def spying(rt):
        enter(rt)
        runner = type(rt.runners["unet"])
        call = runner.__call__

        def counted(self, feed):  # the UNet's calls only: it alone takes a timestep
            if "timestep" in feed:
                batches.append(len(feed["sample"]))
            return call(self, feed)

        monkeypatch.setattr(runner, "__call__", counted)
        return rt

    monkeypatch.setattr(Runtime, "__enter__", spying)
    drift = rc.runtime_drift(out, ref, load_profile("x86-cpu"), "pruned", steps=4)
    assert drift and set(batches) == {2} and len(batches) == 4 * 4
    with Runtime(out) as whole:  # no cap: all four guided conditions in one call of batch 8
        images = whole.generate(list(ref.conditions), seed=rc.IMAGE_SEED, steps=4, scheduler="ddim",
                                guidance=DEFAULT_GUIDANCE)
    assert set(batches[16:]) == {8}
    assert float(np.abs(images - ref.images).max()) == pytest.approx(drift.max_abs, abs=1e-6)


def test_one_at_a_time_holds_one_phase_loaded_and_makes_the_same_images(bundle, monkeypatch):
    """Text encoders, UNet, decoder: each loaded for its phase alone (the runtime check's memory), the same bytes."""
    from tinyprune.runtime.generate import Runtime

    out, _ = bundle
    with Runtime(out) as rt:
        conditions = rt.conditions(["a cat", "the sea"])
        whole = rt.generate(conditions, seed=3, steps=3)
    loaded = []
    with Runtime(out, one_at_a_time=True) as rt:
        assert not any(r.active for r in rt.runners.values())
        for name, runner in rt.runners.items():  # (__call__ is looked up on the class: _infer is the instance's)
            infer = runner._infer
            monkeypatch.setattr(runner, "_infer", lambda feed, name=name, infer=infer: (
                loaded.append((name, sorted(n for n, r in rt.runners.items() if r.active))), infer(feed))[1])
        phased = rt.generate(conditions, seed=3, steps=3)
        assert not any(r.active for r in rt.runners.values())
    assert np.array_equal(whole, phased)
    assert {name for name, _ in loaded} == set(rt.runners) and all(active == [name] for name, active in loaded)


def test_validate_runtime_drift_dense_and_pruned(bundle, tiny_dir, tmp_path):
    from tinyprune.workflows.export import export

    out, _ = bundle
    dense = tmp_path / "dense"
    export(str(tiny_dir), 0.0, "jetson", out=dense, image_checks=1, image_steps=2)
    r = runner.invoke(app, ["validate", str(out), "--model", str(tiny_dir), "--dense", str(dense), "--image-checks", "2",
                            "--image-steps", "3", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    drift = {d["name"]: d for d in json.loads(r.stdout)["runtime_drift"]}
    assert set(drift) == {"image runtime (ort-cpu) vs PyTorch, pruned", "image runtime (ort-cpu) vs PyTorch, dense"}
    for d in drift.values():
        assert d["ok"] and (d["psnr_db"] is None or d["psnr_db"] > 40)
    r = runner.invoke(app, ["validate", str(out), "--model", str(tiny_dir), "--dense", str(out), "--image-checks", "1",
                            "--image-steps", "1"], catch_exceptions=False)
    assert r.exit_code == 2 and "is not a dense bundle (sparsity 0.43)" in r.stderr


def test_runtime_gate_fails_and_old_bundles_skip(bundle, tmp_path):
    from dataclasses import replace

    from tinyprune.config import load_profile
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.judge.runtime_check import runtime_check, torch_e2e_reference

    out, _ = bundle
    ref = torch_e2e_reference(load_pipeline(out / "pruned"), steps=3, n=1)
    strict = replace(load_profile("jetson"), min_runtime_psnr_db=1000.0)
    d = runtime_check(out, ref, strict, "pruned", steps=3)
    assert not d and d.to_dict()["ok"] is False and d.min_psnr_db == 1000.0
    d = runtime_check(tmp_path, ref, strict, "pruned", steps=3)
    assert d and d.skipped and d.psnr_db is None and "no runtime/" in d.reason
