"""The shipped demo pipeline, classifier and held-out digits, loaded the way users load them."""

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
    assert pipe.conditioner.config.num_classes == 10
    assert pipe.unet.config.cross_attention_dim == pipe.conditioner.config.embed_dim
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert not pipe.scheduler.config.clip_sample


def test_demo_ships_safetensors_only_and_fits_the_size_budget():
    files = [p for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "class_embedder", "classifier"}
    # The budget is for the pipeline (20 MB, read as MiB); classifier and eval digits ship beside it.
    pipeline_bytes = sum(p.stat().st_size for p in files if "pipeline" in p.relative_to(DEMO).parts[:1])
    assert pipeline_bytes <= 20 * 2 ** 20
    assert sum(p.stat().st_size for p in files) - pipeline_bytes <= 2 * 2 ** 20


def test_demo_shapes(pipe):
    assert (pipe.latent_size, pipe.latent_channels, pipe.vae_scale) == (8, 4, 4)
    scale = pipe.vae.config.scaling_factor
    assert scale != 1.0 and 0.05 < scale < 20  # measured on the training latents, not the default
    with torch.inference_mode():
        x = torch.zeros(2, 3, 32, 32)
        z = pipe.vae.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert pipe.vae.decode(z).sample.shape == (2, 3, 32, 32)
        ctx = pipe.conditioner(torch.tensor([0, 10]))
        eps = pipe.unet(torch.zeros(2, 4, 8, 8), 500, encoder_hidden_states=ctx).sample
        assert eps.shape == (2, 4, 8, 8)


def test_held_out_digits_and_classifier_ship_with_the_demo():
    with np.load(DEMO / quality.EVAL_DATA, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (360, 32, 32) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 35  # stratified: 20 % of each class (174..183 digits)
    config = json.loads((DEMO / "classifier" / "config.json").read_text())
    assert config["test_accuracy"] >= 0.97


def test_dense_samples_are_the_digits_asked_for(pipe):
    labels = list(range(10))
    images = sample(pipe, labels, seed=0, steps=20)
    assert images.shape == (10, 3, 32, 32)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    pred = quality.predict(quality.load_classifier(), images)
    assert int((pred == np.array(labels)).sum()) >= 8, f"predicted {pred.tolist()} for {labels}"
    again = sample(pipe, labels, seed=0, steps=20)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
