"""The shipped demo (a miniature Stable Diffusion), its classifier and held-out digits, loaded the way users load them."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyprune.judge import quality
from tinyprune.model.pipeline import demo_dir, load_pipeline
from tinyprune.model.sampling import sample

torch.set_num_threads(2)
DEMO = Path(str(resources.files("tinyprune.demo")))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(demo_dir())


def test_demo_loads_through_the_user_loader(pipe):
    assert demo_dir() == DEMO / "pipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.family.name == "stable-diffusion"
    assert type(pipe.parts["text_encoder"]).__name__ == "CLIPTextModel"
    assert pipe.unet.config.cross_attention_dim == pipe.parts["text_encoder"].config.hidden_size
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert not pipe.scheduler.config.clip_sample


def test_demo_ships_safetensors_only_and_fits_the_size_budget():
    files = [p for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder", "classifier"}
    assert sum(p.stat().st_size for p in files) <= 25 * 10 ** 6  # the budget: 25 MB shipped in all


def test_demo_has_stable_diffusions_geometry(pipe):
    assert (pipe.latent_size, pipe.latent_channels, pipe.vae_scale) == (8, 4, 8)
    assert pipe.vae.config.scaling_factor == 0.18215
    with torch.inference_mode():
        x = torch.zeros(2, 3, 64, 64)
        z = pipe.vae.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert pipe.vae.decode(z).sample.shape == (2, 3, 64, 64)
        tok = pipe.parts["tokenizer"]
        ids = tok(["", "the digit 7"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        ctx = pipe.parts["text_encoder"](ids.input_ids).last_hidden_state
        assert ctx.shape == (2, 16, 64)
        eps = pipe.unet(torch.zeros(2, 4, 8, 8), 500, encoder_hidden_states=ctx).sample
        assert eps.shape == (2, 4, 8, 8)


def test_diffusers_loads_the_demo_and_runs_it():
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(demo_dir(), use_safetensors=True, local_files_only=True)
    out = sd("the digit 7, drawn by hand", num_inference_steps=4, guidance_scale=3.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_held_out_phrasings_are_not_trained_on():
    from tinyprune.demo.captions import heldout_prompts, training_captions

    shipped = (DEMO / "pipeline" / "prompts.txt").read_text().splitlines()
    assert shipped == training_captions() and len(shipped) == 100
    held = heldout_prompts(list(range(10)) * 4)
    assert len(set(held)) == 40 and not set(held) & set(shipped)


def test_held_out_digits_and_classifier_ship_with_the_demo():
    with np.load(DEMO / quality.EVAL_DATA, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (360, 32, 32) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 35  # stratified: 20 % of each class (174..183 digits)
    config = json.loads((DEMO / "classifier" / "config.json").read_text())
    assert config["test_accuracy"] >= 0.97


def test_dense_samples_are_the_digits_asked_for(pipe):
    from tinyprune.demo.captions import heldout_prompts

    labels = list(range(10))
    images = sample(pipe, heldout_prompts(labels), seed=0, steps=20)
    assert images.shape == (10, 3, 64, 64)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    pred = quality.predict(quality.load_classifier(), images)
    assert int((pred == np.array(labels)).sum()) >= 8, f"predicted {pred.tolist()} for {labels}"
    again = sample(pipe, heldout_prompts(labels), seed=0, steps=20)
    torch.testing.assert_close(images, again, rtol=0, atol=0)


def test_default_export_is_a_stable_diffusion_bundle_diffusers_runs(tmp_path, monkeypatch):
    """`tinyprune export` without --model: all four ONNX files, the quality gates on the digit yardstick with the
    captioned grid, the pruned pipeline in diffusers' StableDiffusionPipeline, and diffusers' OnnxStableDiffusionPipeline
    on the bundle as it stands making the pruned PyTorch pipeline's image at 64 px."""
    from diffusers import OnnxStableDiffusionPipeline, StableDiffusionPipeline
    from typer.testing import CliRunner

    from tinyprune.cli import app
    from tinyprune.judge.drift import psnr

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["export", "--sparsity", "0.2", "--target", "jetson", "--quality", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "bundle"
    for c in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (out / c / "model.onnx").is_file(), c
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["quality"]["n_samples"] == 20 and report["quality"]["dense"]["accuracy"] >= 0.9
    assert (out / "report" / "grid.png").stat().st_size > 1000
    onnx_pipe = OnnxStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider", local_files_only=True)
    torch_pipe = StableDiffusionPipeline.from_pretrained(out / "pruned", use_safetensors=True, local_files_only=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=3.0, output_type="np")
    got = onnx_pipe("the digit seven, drawn by hand", latents=latents, **kw).images
    want = torch_pipe("the digit seven, drawn by hand", latents=torch.from_numpy(latents), **kw).images
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert psnr(got, want) > 60, psnr(got, want)


def test_shipped_tokenizer_is_the_bpe_learned_from_the_training_captions(pipe):
    from tinyprune.demo.bpe import bpe_files
    from tinyprune.demo.captions import training_captions, vocabulary_gap, words

    for name, text in bpe_files().items():
        assert (DEMO / "pipeline" / "tokenizer" / name).read_text(encoding="utf-8") == text, name
    tok = pipe.parts["tokenizer"]
    assert len(tok) == 587 and vocabulary_gap() == set()
    assert all(len(tok.tokenize(w)) == 1 for w in set(words(training_captions())))
