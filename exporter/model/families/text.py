"""Text-conditioned families: Stable Diffusion 1.x/2.x (and BK-SDM-style smaller UNets), Latent Consistency
Models, and Stable Diffusion XL, each with diffusers' own components (CLIPTextModel, CLIPTokenizer, AutoencoderKL
or AutoencoderTiny) loaded from a local dir.

Prompts are encoded as diffusers' pipelines encode them: padded to the tokenizer's model_max_length, the text
encoder's last hidden state for SD, the penultimate hidden states of both encoders concatenated plus the second's
projected pooled output for SDXL (with time_ids from the image size, no crop). Classifier-free guidance pairs
every prompt with the empty prompt (SDXL: zeros, as `force_zeros_for_empty_prompt`); an LCM embeds its guidance
in `timestep_cond` and runs one UNet call per step.
"""

from __future__ import annotations

import math
from functools import cached_property
from importlib import resources

import torch

from tinyprune.errors import InputError
from tinyprune.model.families.base import ComponentIO, Cond, Family, UNetModule

PROMPTS_FILE = "prompts.txt"
CALIBRATION_PROMPTS = 40  # every third prompt of calibration/prompts.txt: all twelve categories
TEXT_TOLERANCE = 2e-3  # CLIP's hidden states reach |x| ~ 30 at SD size: fp32 reordering drift is ~1e-5 of that
LCM_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default guidance_scale (embedded as w = scale - 1)


def shipped_prompts() -> list[str]:
    """calibration/prompts.txt: the project's prompt set (see calibration/prompts.md); the first ones are the
    image checks' fixed prompts."""
    text = resources.files("tinyprune.calibration_data").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


class TextEncoderModule(torch.nn.Module):
    """input_ids (int32, as diffusers' ONNX pipelines feed them) -> the named outputs of a CLIP text model:
    last_hidden_state, pooler_output or text_embeds, and hidden_states.<i> (optimum's names)."""

    def __init__(self, encoder, outputs: tuple[str, ...]):
        super().__init__()
        self.encoder, self.outputs = encoder, outputs

    def forward(self, input_ids):
        hidden = any(o.startswith("hidden_states.") for o in self.outputs)
        out = self.encoder(input_ids.long(), output_hidden_states=hidden, return_dict=True)
        return tuple(out.hidden_states[int(o.split(".")[1])] if o.startswith("hidden_states.") else getattr(out, o)
                     for o in self.outputs)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding: sinusoidal embedding of w * 1000."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def _width(config: dict) -> int | None:
    return config.get("hidden_size")


class StableDiffusionFamily(Family):
    name = "stable-diffusion"
    PIPELINES = ("StableDiffusionPipeline",)
    VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
    PARTS = {"text_encoder": "transformers.CLIPTextModel", "tokenizer": "transformers.CLIPTokenizer"}
    PRUNABLE_PARTS = ("text_encoder",)
    ENCODERS = (("text_encoder", "tokenizer"),)
    GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance_scale
    ONNX_PIPELINE: str | None = "OnnxStableDiffusionPipeline"  # the ecosystem's ONNX pipeline for the bundle

    @classmethod
    def context_width(cls, configs: dict[str, dict]) -> int:
        return sum(_width(configs[enc]) or 0 for enc, _ in cls.ENCODERS)

    @classmethod
    def check_configs(cls, configs: dict[str, dict], where: str) -> None:
        width, ctx = configs["unet"].get("cross_attention_dim"), cls.context_width(configs)
        if isinstance(width, (list, tuple)):
            width = width[0] if len(set(width)) == 1 else width
        if width != ctx:
            names = " + ".join(f"{enc} ({_width(configs[enc])})" for enc, _ in cls.ENCODERS)
            raise InputError(f"{where}: {names} give context width {ctx} but the UNet's cross_attention_dim is "
                             f"{width}: the text encoder does not belong to this UNet")

    # ---- prompts
    @cached_property
    def prompts(self) -> list[str]:
        """The pipeline's own prompts.txt (one per line, beside model_index.json: the demo's training captions)
        when it has one, else calibration/prompts.txt."""
        own = self.pipe.root / PROMPTS_FILE if self.pipe.root is not None else None
        if own is not None and own.is_file():
            return [line.strip() for line in own.read_text(encoding="utf-8").splitlines() if line.strip()]
        return shipped_prompts()

    def yardstick_conditions(self, digits: list[int]) -> list[str]:
        from tinyprune.demo.captions import heldout_prompts

        return heldout_prompts(digits)

    def check_conditions(self, n: int | None = None) -> list[str]:
        return self.prompts[: self.CHECK_CONDITIONS if n is None else n]

    def calibration_conditions(self, n: int | None = None) -> list[str]:
        """Every third prompt (all twelve categories of calibration/prompts.txt in its first 40); `n`: that many,
        the other prompts following and the list cycling when it is shorter (from_samples gives each chunk of 20
        its own seed, so a prompt asked again is drawn from other noise)."""
        if n is None:
            return self.prompts[::3][:CALIBRATION_PROMPTS]
        order = self.prompts[::3] + self.prompts[1::3] + self.prompts[2::3]
        return [order[i % len(order)] for i in range(n)]

    def image_condition(self, caption: str | None) -> str:
        return caption or ""

    def tokens(self, tokenizer_name: str, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.parts[tokenizer_name]
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    @property
    def context_tokens(self) -> int:
        return int(self.pipe.parts[self.ENCODERS[0][1]].model_max_length)

    def condition(self, conditions: list[str], size: int | None = None) -> Cond:
        enc, tok = self.ENCODERS[0]
        return {"encoder_hidden_states": self.pipe.parts[enc](self.tokens(tok, conditions))[0]}

    def null_condition(self, batch: int, size: int | None = None) -> Cond | None:
        return self.condition([""] * batch)

    # ---- components
    def text_components(self) -> tuple[ComponentIO, ...]:
        comps = []
        for enc, tok in self.ENCODERS:
            model = self.pipe.parts[enc]
            length, vocab = int(self.pipe.parts[tok].model_max_length), int(model.config.vocab_size)
            outputs = self.text_outputs(enc, model)
            comps.append(ComponentIO(
                enc, enc, ("input_ids",), outputs, TEXT_TOLERANCE,
                lambda p, enc=enc, outputs=outputs: TextEncoderModule(p.parts[enc], outputs),
                lambda b, h, length=length: {"input_ids": (b, length)}, {}, {"input_ids": (0, vocab)},
                {"input_ids": "int32"}))
        return tuple(comps)

    def text_outputs(self, name: str, model) -> tuple[str, ...]:
        return ("last_hidden_state", "pooler_output")

    def unet_inputs(self) -> dict[str, tuple[int, ...]]:
        """The conditioning inputs of the UNet and their shapes after the batch axis."""
        cfg = self.pipe.unet.config
        return {"encoder_hidden_states": (self.context_tokens, int(cfg.cross_attention_dim))}

    ADDED: tuple[str, ...] = ()

    # ---- the torch-free runtime
    def tokenizer_json(self, name: str) -> str:
        """The tokenizer as a `tokenizers` JSON that pads and truncates to the encoder's length itself, so that
        the runtime's Tokenizer.encode_batch gives the ids this pipeline's CLIPTokenizer gives."""
        from tokenizers import Tokenizer

        tok = self.pipe.parts[name]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer (transformers 4): its fast twin, converted from vocab and merges
            from transformers import CLIPTokenizerFast

            backend = CLIPTokenizerFast.from_pretrained(self.pipe.root / name, local_files_only=True).backend_tokenizer
        fast = Tokenizer.from_str(backend.to_str())
        length = int(tok.model_max_length)
        fast.enable_truncation(length)
        fast.enable_padding(length=length, pad_id=int(tok.pad_token_id), pad_token=str(tok.pad_token))
        return fast.to_str(pretty=True)

    def runtime_encoder(self, name: str) -> dict:
        """Which text encoder outputs the runtime's UNet context takes (and the pooled one, where added)."""
        return {"context": "last_hidden_state", "pooled": None}

    def runtime_conditioning(self) -> tuple[dict, dict[str, str]]:
        files, encoders = {}, []
        for enc, tok in self.ENCODERS:
            files[f"{tok}.json"] = self.tokenizer_json(tok)
            encoders.append({"component": enc, "tokenizer": f"{tok}.json", **self.runtime_encoder(enc)})
        spec = {"kind": "text", "encoders": encoders, "guided": self.guided, "null": "empty",
                "guidance": self.GUIDANCE, "example_prompts": self.check_conditions(2)}
        return spec, files

    def onnx_index(self) -> dict | None:
        """diffusers' OnnxStableDiffusionPipeline index (optimum's ORTStableDiffusionPipeline.from_pretrained loads it
        too; its class-name lookup, ORTDiffusionPipeline / ORTPipelineForText2Image, does not know this name): every
        ONNX component an OnnxRuntimeModel, the source's tokenizers (by a class transformers 4.x and 5.x both load
        them with) and scheduler, no safety checker.

        optimum's pipelines open <component>/model.onnx and its config.json by subfolder name alone; of this index
        they read `unet` (present: no export), the tokenizers, scheduler and feature_extractor ([library, class],
        loaded from their subfolders) and, as pipeline config, keys such as SDXL's force_zeros_for_empty_prompt."""
        if self.ONNX_PIPELINE is None:
            return None
        from diffusers import __version__

        def tokenizer(entry: list) -> list:
            # transformers 5 saves a CLIP tokenizer as tokenizer.json alone, which 4.x's (slow) CLIPTokenizer cannot
            # read; CLIPTokenizerFast reads it in 4.x (and vocab.json + merges.txt too) and is CLIPTokenizer in 5.x
            return ["transformers", "CLIPTokenizerFast"] if list(entry) == ["transformers", "CLIPTokenizer"] else entry

        index = {"_class_name": self.ONNX_PIPELINE, "_diffusers_version": __version__,
                 **{c.name: ["diffusers", "OnnxRuntimeModel"] for c in self.components()},
                 **{tok: tokenizer(self.pipe.index[tok]) for _, tok in self.ENCODERS},
                 "scheduler": self.pipe.index["scheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        return index

    def components(self) -> tuple[ComponentIO, ...]:
        pipe = self.pipe
        latent_ch, n_train = pipe.latent_channels, int(pipe.scheduler.config.num_train_timesteps)
        cond = self.unet_inputs()
        names = tuple(cond)
        unet = ComponentIO(
            "unet", "unet", ("sample", "timestep", *names), ("out_sample",), 1e-3,
            lambda p: UNetModule(p.unet, names, self.ADDED),
            lambda b, h: {"sample": (b, latent_ch, h, h), "timestep": (b,), **{k: (b, *s) for k, s in cond.items()}},
            {"sample": "latent", "out_sample": "latent"}, {"timestep": (0, n_train)})
        return (*self.text_components(), unet, *self.latent_components())


class LatentConsistencyFamily(StableDiffusionFamily):
    name = "latent-consistency"
    PIPELINES = ("LatentConsistencyModelPipeline",)
    GUIDANCE = LCM_GUIDANCE
    # diffusers has no ONNX LCM pipeline: optimum's, by the name its class-name lookup matches (the same index as SD's)
    ONNX_PIPELINE = "ORTLatentConsistencyModelPipeline"

    @classmethod
    def check_configs(cls, configs: dict[str, dict], where: str) -> None:
        super().check_configs(configs, where)
        if not configs["unet"].get("time_cond_proj_dim"):
            raise InputError(f"{where}: a LatentConsistencyModelPipeline needs a UNet with time_cond_proj_dim "
                             "(the embedded guidance); this one has none")

    @property
    def guided(self) -> bool:
        return False

    def condition(self, conditions: list[str], size: int | None = None) -> Cond:
        cond = super().condition(conditions)
        w = torch.full((len(conditions),), LCM_GUIDANCE - 1)
        cond["timestep_cond"] = guidance_embedding(w, int(self.pipe.unet.config.time_cond_proj_dim))
        return cond

    def null_condition(self, batch: int, size: int | None = None) -> Cond | None:
        return None

    def unet_inputs(self) -> dict[str, tuple[int, ...]]:
        return {**super().unet_inputs(), "timestep_cond": (int(self.pipe.unet.config.time_cond_proj_dim),)}

    def runtime_conditioning(self) -> tuple[dict, dict[str, str]]:
        spec, files = super().runtime_conditioning()
        return {**spec, "timestep_cond_dim": int(self.pipe.unet.config.time_cond_proj_dim)}, files


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "stable-diffusion-xl"
    PIPELINES = ("StableDiffusionXLPipeline",)
    PARTS = {"text_encoder": "transformers.CLIPTextModel", "tokenizer": "transformers.CLIPTokenizer",
             "text_encoder_2": "transformers.CLIPTextModelWithProjection", "tokenizer_2": "transformers.CLIPTokenizer"}
    PRUNABLE_PARTS = ("text_encoder", "text_encoder_2")
    ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    ADDED = ("text_embeds", "time_ids")
    GUIDANCE = 5.0  # StableDiffusionXLPipeline's default guidance_scale
    ONNX_PIPELINE = "ORTStableDiffusionXLPipeline"  # diffusers has no ONNX SDXL pipeline: optimum's

    def onnx_index(self) -> dict | None:
        """StableDiffusionXLPipeline's keys: no safety checker, a second tokenizer, and force_zeros_for_empty_prompt
        (which optimum's pipeline reads from this index as its config: zeros as the unconditional embedding)."""
        index = {k: v for k, v in super().onnx_index().items()
                 if k not in ("safety_checker", "requires_safety_checker")}
        return {**index, "image_encoder": [None, None],
                "force_zeros_for_empty_prompt": bool(self.pipe.index.get("force_zeros_for_empty_prompt", True))}

    @classmethod
    def check_configs(cls, configs: dict[str, dict], where: str) -> None:
        super().check_configs(configs, where)
        unet = configs["unet"]
        pooled = configs["text_encoder_2"].get("projection_dim")
        want = unet.get("projection_class_embeddings_input_dim")
        got = (pooled or 0) + 6 * (unet.get("addition_time_embed_dim") or 0)
        if unet.get("addition_embed_type") != "text_time" or want != got:
            raise InputError(f"{where}: the UNet's added conditioning (addition_embed_type "
                             f"{unet.get('addition_embed_type')!r}, projection_class_embeddings_input_dim {want}) "
                             f"does not take text_encoder_2's pooled width {pooled} + 6 time ids")

    def text_outputs(self, name: str, model) -> tuple[str, ...]:
        hidden = tuple(f"hidden_states.{i}" for i in range(int(model.config.num_hidden_layers) + 1))
        first = ("text_embeds", "last_hidden_state") if name == "text_encoder_2" else ("last_hidden_state",
                                                                                     "pooler_output")
        return first + hidden

    def time_ids(self, batch: int, size: int | None = None) -> torch.Tensor:
        """(original size, crop top-left, target size) of the image size sampled at (latent `size`, default the
        native one; the image checks sample at the profile's resolution): no crop, no resize."""
        size = (size or self.pipe.latent_size) * self.pipe.vae_scale
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)

    def condition(self, conditions: list[str], size: int | None = None) -> Cond:
        hidden, pooled = [], None
        for enc, tok in self.ENCODERS:
            out = self.pipe.parts[enc](self.tokens(tok, conditions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the last encoder (CLIPTextModelWithProjection)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(len(conditions), size)}}

    def null_condition(self, batch: int, size: int | None = None) -> Cond | None:
        if not self.pipe.index.get("force_zeros_for_empty_prompt", True):
            return self.condition([""] * batch, size)
        cond = self.condition([""], size)
        return {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]).repeat(batch, 1, 1),
                "added_cond_kwargs": {"text_embeds": torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"])
                                      .repeat(batch, 1), "time_ids": self.time_ids(batch, size)}}

    def runtime_encoder(self, name: str) -> dict:
        penultimate = int(self.pipe.parts[name].config.num_hidden_layers) - 1  # hidden_states[-2] of n + 1
        return {"context": f"hidden_states.{penultimate}", "pooled": "text_embeds" if name == "text_encoder_2" else None}

    def runtime_conditioning(self) -> tuple[dict, dict[str, str]]:
        spec, files = super().runtime_conditioning()
        zeros = self.pipe.index.get("force_zeros_for_empty_prompt", True)
        return {**spec, "null": "zeros" if zeros else "empty", "time_ids": self.time_ids(1)[0].tolist()}, files

    def unet_inputs(self) -> dict[str, tuple[int, ...]]:
        pooled = int(self.pipe.parts["text_encoder_2"].config.projection_dim)
        return {**super().unet_inputs(), "text_embeds": (pooled,), "time_ids": (6,)}
