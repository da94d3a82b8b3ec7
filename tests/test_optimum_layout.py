"""SDXL and LCM bundles as optimum-onnx's ORT pipelines load them (optimum/onnxruntime/modeling_diffusion.py):
from_pretrained(BUNDLE) needs model_index.json with `unet` (else it exports), opens <component>/model.onnx with its
config.json by subfolder name, loads tokenizers and scheduler by their [library, class] entries from their
subfolders, and looks the pipeline up by `_class_name` (the ORT class's name or its diffusers class's name). The
optimum venv is separate (transformers < 4.58): here the structure is asserted; the image match against PyTorch is
benchmarks/optimum_client.py, and the last test runs optimum where it is importable."""

import json

import numpy as np
import onnx
import pytest
import torch

# optimum-onnx 0.1.0: ORT_TEXT2IMAGE_PIPELINES_MAPPING's classes, by the name `_get_ort_class` matches
ORT_CLASS = {"sdxl": "ORTStableDiffusionXLPipeline", "lcm": "ORTLatentConsistencyModelPipeline"}
TEXT_ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "lcm": ("text_encoder",)}
SCHEDULER = {"sdxl": "EulerDiscreteScheduler", "lcm": "LCMScheduler"}


def _io(path):
    model = onnx.load(str(path), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


@pytest.mark.parametrize("name", ["sdxl", "lcm"])
def test_model_index_is_what_optimums_pipeline_loads(family_bundle, name):
    out, _ = family_bundle(name)
    index = json.loads((out / "model_index.json").read_text())
    comps = {"unet", "vae_encoder", "vae_decoder", *TEXT_ENCODERS[name]}
    assert index["_class_name"] == ORT_CLASS[name]
    assert {k for k, v in index.items() if v == ["diffusers", "OnnxRuntimeModel"]} == comps
    for comp in comps:  # optimum opens these two by subfolder; ORTModelMixin refuses a model.onnx without config.json
        assert (out / comp / "model.onnx").is_file() and (out / comp / "config.json").is_file()
    tokenizers = {"tokenizer", "tokenizer_2"} if name == "sdxl" else {"tokenizer"}
    assert {k for k in index if k.startswith("tokenizer")} == tokenizers
    for tok in tokenizers:  # read by transformers 4.x (optimum's) from tokenizer.json alone, as 5.x saves it
        assert index[tok] == ["transformers", "CLIPTokenizerFast"] and (out / tok / "tokenizer.json").is_file()
    assert index["scheduler"] == ["diffusers", SCHEDULER[name]]
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert index["feature_extractor"] == [None, None]  # optimum loads every submodel whose library is not None
    if name == "sdxl":  # StableDiffusionXLPipeline's config keys; encode_prompt reads force_zeros_for_empty_prompt
        assert index["force_zeros_for_empty_prompt"] is True and index["image_encoder"] == [None, None]
        assert "safety_checker" not in index and "requires_safety_checker" not in index
    else:
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


@pytest.mark.parametrize("name", ["sdxl", "lcm"])
def test_component_configs_and_io_names_are_what_optimum_reads(family_bundle, name):
    out, _ = family_bundle(name)
    cfg = {c: json.loads((out / c / "config.json").read_text())
           for c in ("unet", "vae_encoder", "vae_decoder", *TEXT_ENCODERS[name])}
    # ORTUnet: time_cond_proj_dim (LCM's w embedding width); the pipelines: sample_size, the VAE's scale and factor
    assert cfg["unet"]["time_cond_proj_dim"] == (32 if name == "lcm" else None) and cfg["unet"]["sample_size"] == 16
    for vae in ("vae_encoder", "vae_decoder"):
        assert cfg[vae]["scaling_factor"] == 0.18215 and cfg[vae]["block_out_channels"] == [16, 32]
    unet_in, unet_out = _io(out / "unet" / "model.onnx")
    added = ["text_embeds", "time_ids"] if name == "sdxl" else ["timestep_cond"]
    assert unet_in == ["sample", "timestep", "encoder_hidden_states", *added] and unet_out == ["out_sample"]
    assert _io(out / "vae_decoder" / "model.onnx") == (["latent_sample"], ["sample"])
    assert _io(out / "vae_encoder" / "model.onnx") == (["sample"], ["latent_sample"])
    for enc in TEXT_ENCODERS[name]:
        layers = cfg[enc]["num_hidden_layers"]  # ORTTextEncoder pops hidden_states.0 .. layers-1 by this count
        ins, outs = _io(out / enc / "model.onnx")
        first = ["text_embeds", "last_hidden_state"] if enc == "text_encoder_2" else ["last_hidden_state",
                                                                                      "pooler_output"]
        hidden = [f"hidden_states.{i}" for i in range(layers + 1)] if name == "sdxl" else []
        assert ins == ["input_ids"] and outs == first + hidden  # SDXL's encode_prompt: [0] of text_encoder_2 = pooled
    if name == "sdxl":
        assert cfg["text_encoder_2"]["projection_dim"] == 32  # the pipeline's text_encoder_projection_dim


@pytest.mark.parametrize("name", ["sdxl", "lcm"])
def test_bundle_tokenizer_class_tokenizes_as_the_pruned_pipeline(family_bundle, name):
    import transformers
    from transformers import AutoTokenizer

    out, _ = family_bundle(name)
    index = json.loads((out / "model_index.json").read_text())
    prompts = ["a red bicycle", ""]
    for tok in [k for k in index if k.startswith("tokenizer")]:
        got = getattr(transformers, index[tok][1]).from_pretrained(out / tok)
        want = AutoTokenizer.from_pretrained(out / "pruned" / tok)
        kw = dict(padding="max_length", max_length=want.model_max_length, truncation=True)
        assert got.model_max_length == want.model_max_length == 77
        assert got(prompts, **kw).input_ids == want(prompts, **kw).input_ids


@pytest.mark.parametrize("name", ["sdxl", "lcm"])
def test_optimum_pipeline_makes_the_pruned_pipelines_image(family_bundle, name):
    """Where optimum-onnx is importable (it pins transformers < 4.58; benchmarks/optimum_client.py runs it in its
    own venv otherwise): its ORT pipeline on the bundle dir against diffusers on BUNDLE/pruned, same latents."""
    md = pytest.importorskip("optimum.onnxruntime.modeling_diffusion")
    from diffusers import DiffusionPipeline

    from tinyprune.judge.drift import psnr

    out, _ = family_bundle(name)
    ort = getattr(md, ORT_CLASS[name]).from_pretrained(out, provider="CPUExecutionProvider", local_files_only=True)
    pt = DiffusionPipeline.from_pretrained(out / "pruned", local_files_only=True)
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32))
    kw = dict(num_inference_steps=3, guidance_scale=5.0 if name == "sdxl" else 8.5, height=32, width=32,
              output_type="np")
    # LCMScheduler draws fresh noise between steps: the same torch CPU generator on both sides
    got, want = (p("a red bicycle", latents=latents, generator=torch.Generator("cpu").manual_seed(0), **kw).images
                 for p in (ort, pt))
    assert got.shape == want.shape == (1, 32, 32, 3)
    assert psnr(got, want) > 60
