"""The torch-free runtime for every family: its tokenizer against CLIPTokenizer, its loop against diffusers' own
pipelines on the bundle's pruned/ weights, `tinyprune generate --prompt` and the runtime's bench with torch
unimportable, and bench-merge over several boards' results."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from blocking import blocked_imports

from tinyprune.cli import app
from tinyprune.judge.drift import psnr
from tinyprune.model.pipeline import load_pipeline

PROMPTS = ["a red bicycle", "", "A Photo of THE Ocean, at night!!", "naïve café — ünïcödé 東京 🚲",
           " ".join(["a very long prompt that goes on"] * 20), "the and of in ing thing"]


@pytest.fixture(scope="module")
def bundles(family_bundle):
    return {name: family_bundle(name)[0] for name in ("sd", "sdxl", "lcm", "ddpm", "ldm")}


@pytest.mark.parametrize("name,tokenizer", [("sd", "tokenizer"), ("sd2", "tokenizer"), ("sdxl", "tokenizer"),
                                            ("sdxl", "tokenizer_2")])
def test_runtime_tokenizer_gives_clip_ids(family_dirs, tmp_path, name, tokenizer):
    """runtime/<tokenizer>.json through the `tokenizers` library: the ids the pipeline's CLIPTokenizer gives,
    padded and truncated to its length (the long prompt is cut to 77 with the end token last)."""
    from tokenizers import Tokenizer

    pipe = load_pipeline(family_dirs[name])
    tok = pipe.parts[tokenizer]
    path = tmp_path / "t.json"
    path.write_text(pipe.family.tokenizer_json(tokenizer))
    want = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    got = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(PROMPTS)]
    assert got == want
    assert len(got[4]) == 77 and got[4][-1] == tok.eos_token_id and got[1][0] == tok.bos_token_id
    assert pipe.family.tokenizer_json(tokenizer) == path.read_text()  # deterministic bytes


def test_runtime_files_per_family(bundles):
    shapes = {n: json.loads((b / "runtime" / "shapes.json").read_text()) for n, b in bundles.items()}
    assert shapes["sd"]["conditioning"]["encoders"] == [
        {"component": "text_encoder", "tokenizer": "tokenizer.json", "context": "last_hidden_state", "pooled": None}]
    xl = shapes["sdxl"]["conditioning"]
    assert [e["context"] for e in xl["encoders"]] == ["hidden_states.2", "hidden_states.2"]  # [-2] of 3 layers + 1
    assert xl["encoders"][1]["pooled"] == "text_embeds" and xl["null"] == "zeros"
    assert xl["time_ids"] == [32, 32, 0, 0, 32, 32]
    lcm = shapes["lcm"]["conditioning"]
    assert lcm["guided"] is False and lcm["timestep_cond_dim"] == 32 and lcm["guidance"] == 8.5
    assert shapes["ddpm"]["decoder"] is None and shapes["ddpm"]["conditioning"] == {"kind": "none"}
    assert shapes["ldm"]["decoder"] == "vae_decoder"
    assert "tokenizers" in (bundles["sd"] / "runtime" / "README.md").read_text()


def _runtime_images(bundle, conditions, steps, scheduler=None, guidance=None, seed=0):
    from tinyprune.runtime.generate import Runtime

    with Runtime(bundle) as rt:
        return rt.generate(conditions, seed=seed, steps=steps, scheduler=scheduler, guidance=guidance)


def _noise(bundle, n, seed=0):
    s = json.loads((bundle / "runtime" / "shapes.json").read_text())
    return np.random.default_rng(seed).standard_normal(
        (n, s["latent_channels"], s["latent_size"], s["latent_size"])).astype(np.float32)


@torch.inference_mode()
@pytest.mark.parametrize("name,steps", [("sd", 4), ("sdxl", 3), ("lcm", 1)])
def test_runtime_makes_the_image_diffusers_makes(bundles, name, steps):
    """The bundle's own scheduler (PNDM for SD, Euler for SDXL, LCM), CFG with the empty prompt (SDXL: zeros plus
    text_embeds and time_ids), an LCM's embedded guidance: the runtime's image is diffusers' pipeline's on pruned/
    from the same initial latents (LCM at 1 step, where its scheduler adds no noise)."""
    from diffusers import DiffusionPipeline

    bundle = bundles[name]
    pipe = DiffusionPipeline.from_pretrained(bundle / "pruned", use_safetensors=True, local_files_only=True)
    guidance = {"sd": 7.5, "sdxl": 5.0, "lcm": 8.5}[name]
    prompts = ["a red bicycle", "the ocean at night"]
    got = _runtime_images(bundle, prompts, steps)  # the family's default guidance
    lat = torch.from_numpy(_noise(bundle, len(prompts)))
    size = got.shape[-1]
    want = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=lat, height=size, width=size,
                output_type="np").images.transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    assert psnr(want, got, 1.0) > 60


@torch.inference_mode()
def test_runtime_unconditional_ldm_matches_diffusers(bundles, monkeypatch):
    import importlib

    from diffusers import LDMPipeline

    bundle = bundles["ldm"]
    pipe = LDMPipeline.from_pretrained(bundle / "pruned", use_safetensors=True, local_files_only=True)
    got = _runtime_images(bundle, [None, None], 4)
    noise = torch.from_numpy(_noise(bundle, 2))  # LDMPipeline takes no latents: its noise draw returns ours
    monkeypatch.setattr(importlib.import_module(LDMPipeline.__module__), "randn_tensor", lambda *a, **k: noise)
    want = pipe(batch_size=2, num_inference_steps=4, eta=0.0, output_type="np").images.transpose(0, 3, 1, 2)
    assert psnr(want, got, 1.0) > 60


def test_runtime_ddpm_in_pixel_space_is_reproducible(bundles):
    """DDPM steps draw their noise from the seed's generator after the initial noise: same seed, same image."""
    a = _runtime_images(bundles["ddpm"], [None], 5, seed=3)
    b = _runtime_images(bundles["ddpm"], [None], 5, seed=3)
    c = _runtime_images(bundles["ddpm"], [None], 5, seed=4)
    assert a.shape == (1, 3, 16, 16) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_runtime_refuses_the_wrong_condition(bundles, tmp_path):
    r = CliRunner().invoke(app, ["generate", str(bundles["ddpm"]), "--prompt", "x", "--out", str(tmp_path / "i")])
    assert r.exit_code == 2 and "--num-images N only" in r.output
    assert not (tmp_path / "i").exists()


@pytest.fixture(scope="module")
def torchless(tmp_path_factory):
    """A device without torch, transformers, diffusers or onnx (tinyprune's CLI itself importable)."""
    return blocked_imports(tmp_path_factory.mktemp("torchless"))


def test_generate_prompt_writes_a_png_with_torch_unimportable(bundles, torchless, tmp_path):
    from PIL import Image

    env, log = torchless
    tp = [sys.executable, "-c", "import sys; from tinyprune.cli import main; sys.argv[0] = 'tinyprune'; main()"]
    r = subprocess.run(tp + ["generate", str(bundles["sd"]), "--prompt", "a red bicycle", "--steps", "3",
                             "--out", str(tmp_path / "imgs"), "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not log.exists() or not log.read_text(), f"tried to import: {log.read_text()}"
    (png,) = json.loads(r.stdout)["files"]
    assert png.endswith("00_a-red-bicycle_seed0.png") and Image.open(png).size == (32, 32)


def test_runtime_bench_json_without_torch_and_merge(bundles, torchless, tmp_path):
    env, log = torchless
    runs = []
    for name in ("sd", "sdxl"):
        f = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "-m", "tinyprune.runtime", "bench", str(bundles[name]), "--iters", "2",
                            "--warmup", "1", "--gen-iters", "1", "--steps", "2", "--device", f"board-{name}",
                            "--out", str(f)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        runs.append(f)
    assert not log.exists() or not log.read_text(), f"tried to import: {log.read_text()}"
    res = json.loads(runs[1].read_text())
    assert res["format"] == "tinyprune-bench/1" and res["device"]["name"] == "board-sdxl"
    assert res["backend"] == "ort-cpu" and res["precision"] == "fp32" and res["versions"]["onnxruntime"]
    assert list(res["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    for row in [*res["components"].values(), res["generation"]]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["peak_rss_mb"] is not None and row["peak_rss_mb"] >= 0
    assert res["generation"]["step"]["n"] == 1
    r = CliRunner().invoke(app, ["bench-merge", *map(str, runs), "--out", str(tmp_path / "boards"), "--json"])
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)
    assert [row["board"] for row in table["rows"]] == ["board-sd", "board-sdxl"]
    assert table["rows"][0]["text_encoder_2_p50_ms"] is None and table["rows"][1]["text_encoder_2_p50_ms"] > 0
    assert (tmp_path / "boards" / "boards.png").stat().st_size > 1000
    assert "board-sdxl" in (tmp_path / "boards" / "boards.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = CliRunner().invoke(app, ["bench-merge", str(bad)])
    assert r.exit_code == 2 and "not a runtime bench result" in r.output
