"""Stable-Diffusion-sized UNets: export-time work (trace, drift and image checks) at a smaller latent than the
profile's, the files keeping dynamic height and width, and the runtime check (SDXL's time_ids included) at that size.
The tiny pipelines stand in for large ones by lowering CHECK_WORK; the SD-1.5 and SDXL figures are in
benchmarks/results/sd15_scale.md."""

from __future__ import annotations

import json

import onnx
import pytest

from tinyprune import config


def test_work_latent_is_the_largest_multiple_of_8_within_the_work():
    assert config.work_latent(859_520_964, 64) == 16  # SD-1.5's UNet at native 64 -> 128 px
    assert config.work_latent(2_567_463_684, 128) == 8  # SDXL's -> 64 px
    assert config.work_latent(859_520_964, 16) is None  # already within
    assert config.work_latent(80_000_000, 16) is None  # the mid-size UNet keeps every default
    assert config.work_latent(2_800_000, 16) is None  # the demo's
    assert config.work_latent(10 ** 12, 64) == 8  # never below one latent block


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_a_large_unet_is_checked_at_the_work_latent_with_every_gate_on(family_dirs, tmp_path, monkeypatch, name):
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.workflows.export import export

    pipe = load_pipeline(family_dirs[name])
    params, native = sum(p.numel() for p in pipe.unet.parameters()), pipe.latent_size
    assert native == 16
    monkeypatch.setattr(config, "CHECK_WORK", params * 8 ** 2)  # this UNet now costs what SD-1.5's does at 64
    lines = []
    result = export(str(family_dirs[name]), 0.2, "x86-cpu", out=tmp_path / "b", log=lines.append).to_dict()

    notice = "image checks sample 1 condition(s), 8 steps at latent 8"
    assert any(notice in n for n in result["notices"]) and any(notice in line for line in lines)
    # every gate ran (none skipped), the runtime's images at latent 8 match PyTorch's as closely as at native size
    assert not result["image_drift"]["skipped"] and result["image_drift"]["ok"]
    runtime = result["runtime_drift"][0]
    assert not runtime["skipped"] and runtime["psnr_db"] > 40
    assert {d["name"].split(".")[0] for d in result["onnx_drift"]} == {"text_encoder", "text_encoder_2", "unet",
                                                                      "vae_encoder", "vae_decoder"} - (
        set() if name == "sdxl" else {"text_encoder_2"})
    assert all(d["ok"] for d in result["onnx_drift"])
    # the files keep the profile's shapes (native 16) for TensorRT, with height and width dynamic: traced at 8
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    sample = onnx.load(str(tmp_path / "b" / "unet" / "model.onnx"), load_external_data=False).graph.input[0]
    dims = [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim]
    assert dims[1] == 4 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    shapes = manifest["components"]["unet"]["inputs"]["sample"]
    assert shapes["opt"][2:] == [native, native]
    # exported from the saved pruned/ pipeline, one component at a time: no path of the staging dir in the bundle
    assert "_name_or_path" not in json.loads((tmp_path / "b" / "unet" / "config.json").read_text())


def test_a_small_unet_keeps_the_default_checks(family_dirs):
    from tinyprune.config import load_profile
    from tinyprune.judge.checks import CheckOptions
    from tinyprune.model.pipeline import load_pipeline

    options = CheckOptions(load_profile("x86-cpu")).for_pipeline(load_pipeline(family_dirs["sd"]))
    assert options.scaled is None and options.image_checks is None and options.image_steps is None
