"""The model-family seam: adapters chosen from model_index.json, specs from the config, the pipeline's own scheduler."""

import json

import torch

import pytest

from tinyprune.errors import InputError
from tinyprune.model.families import family_for
from pipelines import tiny as tiny_pipeline
from tinyprune.model.pipeline import load_pipeline, save_pipeline


def test_tiny_sd_gets_the_text_adapter_and_its_prompts(tiny_dir):
    from tinyprune.model.families.text import StableDiffusionFamily, shipped_prompts

    pipe = load_pipeline(tiny_dir)
    assert type(pipe.family) is StableDiffusionFamily
    assert pipe.family.check_conditions(3) == shipped_prompts()[:3]  # no prompts.txt of its own
    assert pipe.family.context_tokens == 16
    cond = pipe.family.condition(["a red bicycle", "a cat"])
    assert list(cond) == ["encoder_hidden_states"] and tuple(cond["encoder_hidden_states"].shape) == (2, 16, 32)
    null = pipe.family.null_condition(3)["encoder_hidden_states"]
    assert tuple(null.shape) == (3, 16, 32) and torch.equal(null[0], null[2])
    assert torch.equal(null[:1], pipe.family.condition([""])["encoder_hidden_states"])  # guidance pairs with ""
    assert pipe.family.yardstick_conditions([7, 7, 3]) == ["a handwritten number 7", "the digit seven, drawn by hand",
                                                           "a handwritten number 3"]


def test_a_pipelines_own_prompts_replace_the_shipped_ones_and_travel_with_it(tiny_dir, tmp_path):
    import shutil

    own = tmp_path / "own"
    shutil.copytree(tiny_dir, own)
    (own / "prompts.txt").write_text("the digit 1\n\n  a handwritten two \n")
    pipe = load_pipeline(own)
    assert pipe.family.check_conditions() == ["the digit 1", "a handwritten two"]
    assert pipe.family.calibration_conditions() == ["the digit 1"]  # every third
    # a count: the other prompts follow, then the list cycles (each chunk of samples has its own seed)
    assert pipe.family.calibration_conditions(5) == ["the digit 1", "a handwritten two", "the digit 1",
                                                     "a handwritten two", "the digit 1"]
    from tinyprune.model.calibration import calibration_batches

    batches = calibration_batches(pipe, samples=5, batch_size=4)
    assert [len(b.t) for b in batches] == [4, 1]
    assert not torch.equal(batches[0].x0[0], batches[0].x0[2])  # the same prompt, other noise, another sample
    save_pipeline(pipe, tmp_path / "saved")
    assert (tmp_path / "saved" / "prompts.txt").read_text() == (own / "prompts.txt").read_text()


def test_unsupported_pipeline_named_with_the_supported_ones():
    with pytest.raises(InputError) as e:
        family_for({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, "m")
    assert "pipeline FluxPipeline (transformer FluxTransformer2DModel) is not supported; supported: " \
        "StableDiffusionPipeline; StableDiffusionXLPipeline; LatentConsistencyModelPipeline; DDPMPipeline; " \
        "LDMPipeline" in str(e.value)


def test_specs_follow_the_config_and_name_latent_and_image_axes_apart():
    from tinyprune.config import ExportSpec, Range
    from tinyprune.export.specs import component_spec, component_specs

    pipe = tiny_pipeline(seed=0, cross_dim=48)
    assert [s.name for s in component_specs(pipe)] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    unet = component_spec(pipe, "unet")
    assert unet.shape(2, 8)["encoder_hidden_states"] == (2, 16, 48)  # from the configs, not a constant
    spec = ExportSpec(opset=17, batch=Range(1, 2, 4), latent=Range(8, 8, 16))
    axes = component_spec(pipe, "vae_decoder").dynamic_axes(spec)
    assert axes == {"latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
                    "sample": {0: "batch", 2: "height", 3: "width"}}
    assert component_spec(pipe, "unet").dynamic_axes(spec)["encoder_hidden_states"] == {0: "batch"}
    with pytest.raises(InputError, match="no text_encoder_2 component"):
        component_spec(pipe, "text_encoder_2")


def test_euler_pipeline_keeps_its_scheduler_into_the_bundle(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from tinyprune.workflows.export import export

    pipe = tiny_pipeline(seed=0)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    save_pipeline(pipe, tmp_path / "euler")
    assert type(load_pipeline(tmp_path / "euler").scheduler).__name__ == "EulerDiscreteScheduler"

    out = tmp_path / "bundle"
    export(str(tmp_path / "euler"), 0.3, "x86-cpu", out=out, image_checks=0, quality=0)
    for rel in ("runtime/scheduler_config.json", "pruned/scheduler/scheduler_config.json"):
        assert json.loads((out / rel).read_text())["_class_name"] == "EulerDiscreteScheduler", rel
    assert type(load_pipeline(out / "pruned").scheduler).__name__ == "EulerDiscreteScheduler"


def test_an_unsupported_diffusers_pipeline_is_refused_in_one_line(tmp_path):
    """A pipeline saved by diffusers' own save_pretrained, of a class without an adapter: named, exit 2."""
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel
    from typer.testing import CliRunner

    from tinyprune.cli import app

    unet = UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    ScoreSdeVePipeline(unet=unet, scheduler=ScoreSdeVeScheduler()).save_pretrained(tmp_path / "sde")
    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "sde"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {tmp_path / 'sde'}: pipeline ScoreSdeVePipeline (scheduler ScoreSdeVeScheduler, unet UNet2DModel) "
        "is not supported; supported: StableDiffusionPipeline; ")
    assert not (tmp_path / "out").exists()
