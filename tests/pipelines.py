"""Tiny pipelines of every family, built from diffusers' and transformers' own classes and configs (the shapes of
diffusers' own dummy components, norm groups of 8 so that structured pruning has units to remove) and saved with
the pipeline class's own save_pretrained; the CLIP tokenizer is built from a byte-level vocabulary written here.

    save(name, dir) -> dir      name: one of FAMILIES
    tiny(seed) -> Pipeline      tinyprune's loaded form of a small SD pipeline (the unit tests' model)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinyprune.demo.bpe import byte_characters

FAMILIES = ("sd", "sd2", "sdxl", "lcm", "taesd", "ddpm", "ldm")  # save() also builds "bk-sdm"
CONTEXT = 32  # CLIP hidden size of the tiny text encoders


def tokenizer(work: Path, max_length: int = 77):
    """A CLIPTokenizer over single bytes plus a few merges: every prompt tokenizes, nothing is downloaded."""
    from transformers import CLIPTokenizer

    work.mkdir(parents=True, exist_ok=True)
    chars = list(byte_characters().values())
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "in g</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "an", "and</w>", "of</w>", "in", "ing</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (work / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=max_length)


def text_encoder(projection: bool = False, vocab: int = 1000, layers: int = 3, width: int = CONTEXT):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=width, intermediate_size=64,
                         layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=layers, pad_token_id=1,
                         vocab_size=vocab, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def kl_vae(sample_size: int = 64):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=sample_size)


def cond_unet(**kw):
    from diffusers import UNet2DConditionModel

    args = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8)
    args.update(kw)
    return UNet2DConditionModel(**args)


def build(name: str, work: Path, seed: int = 0):
    """The diffusers pipeline object of a tiny `name` pipeline (random weights, fixed seed)."""
    import diffusers as d

    torch.manual_seed(seed)
    if name in ("sd", "sd2", "taesd", "lcm", "bk-sdm"):
        if name == "sd2":  # SD-2-style: v-prediction, Euler, linear projections, per-block head dims, upcast
            unet = cond_unet(use_linear_projection=True, attention_head_dim=(4, 8), upcast_attention=True)
            sched = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading")
        elif name == "lcm":
            unet = cond_unet(time_cond_proj_dim=32)
            sched = d.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=False)
        else:  # SD 1.x: PNDM, epsilon; BK-SDM: the same without a mid block
            unet = cond_unet(mid_block_type=None) if name == "bk-sdm" else cond_unet()
            sched = d.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, steps_offset=1)
        vae = kl_vae() if name != "taesd" else d.AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 1, 1),
            num_decoder_blocks=(1, 1, 1), latent_channels=4)
        parts = dict(unet=unet, vae=vae, scheduler=sched, text_encoder=text_encoder(), tokenizer=tokenizer(work / "vocab"))
        if name == "lcm":
            return d.LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
        return d.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    if name == "sdxl":
        unet = cond_unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8),
                         use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                         transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + CONTEXT,
                         cross_attention_dim=2 * CONTEXT)
        sched = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                         beta_schedule="scaled_linear", timestep_spacing="leading")
        tok = tokenizer(work / "vocab")
        return d.StableDiffusionXLPipeline(unet=unet, vae=kl_vae(), scheduler=sched, text_encoder=text_encoder(),
                                           text_encoder_2=text_encoder(projection=True), tokenizer=tok, tokenizer_2=tok)
    if name == "ddpm":
        unet = d.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
        return d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler(num_train_timesteps=1000))
    if name == "ldm":
        unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
        vq = d.VQModel(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=3,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=8, num_vq_embeddings=64)
        return d.LDMPipeline(vqvae=vq, unet=unet, scheduler=d.DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    raise ValueError(f"unknown tiny family {name!r}; known: {', '.join(FAMILIES)}")


def save(name: str, out: Path, seed: int = 0) -> Path:
    """Build the tiny `name` pipeline and save it with its pipeline class's save_pretrained (safetensors)."""
    out = Path(out)
    build(name, out.parent / f".{out.name}-work", seed).save_pretrained(out, safe_serialization=True)
    return out


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}


def tiny(seed: int = 0, cross_dim: int = CONTEXT):
    """A small Stable Diffusion pipeline in tinyprune's loaded form (random weights): 32x32 images, 8x8x4 latents,
    DDIM; the UNet and VAE are built first from the seed, so their weights do not depend on the text side."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from tinyprune.model.pipeline import Pipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=32,
    )
    encoder = text_encoder(layers=2, width=cross_dim)
    tok = tokenizer(Path(tempfile.mkdtemp(prefix="tiny-vocab-")), max_length=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              steps_offset=1)
    return Pipeline(unet, vae, scheduler, {"text_encoder": encoder, "tokenizer": tok}, dict(SD_INDEX)).eval()
