"""What the runtime conditions the UNet with, per family, from runtime/shapes.json's "conditioning" entry.

    text    the demo, Stable Diffusion, SDXL, LCM: prompts tokenized with the `tokenizers` library on the bundle's
            runtime/<tokenizer>.json (padding and truncation to the encoder's length are inside that file), run
            through the bundle's text encoder(s); SDXL concatenates the penultimate hidden states of both and
            adds the second's pooled `text_embeds` and `time_ids`; the unconditional side is the empty prompt
            (SDXL: zeros, as force_zeros_for_empty_prompt); an LCM embeds its guidance in `timestep_cond` and
            runs one UNet call per step
    none    DDPM, LDM: sample and timestep only, no guidance

Every conditioning gives the UNet's extra feeds for a batch of conditions: cond(conditions, guidance) and
uncond(batch) (None where the family samples without guidance). Depends on numpy (and `tokenizers` for text).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import BackendMissing, InputError

DEFAULT_GUIDANCE = 3.0  # tinyprune.model.sampling's, which the export's runtime check compares against


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding in float32: sinusoidal embedding of w * 1000."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-(math.log(10000.0) / (half - 1))))
    emb = (np.asarray(w, dtype=np.float32) * np.float32(1000.0))[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    return np.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


class Conditioning:
    """One family's conditioning. components: the bundle components it runs (text encoders); condition_kind:
    what a condition is ("prompt", "none"); guided: whether the loop pairs it with uncond()."""

    components: tuple[str, ...] = ()
    condition_kind = "none"
    guided = False

    def __init__(self, spec: dict, runtime_dir: Path):
        self.spec = spec
        self.default_guidance = float(spec.get("guidance", DEFAULT_GUIDANCE))
        self.runners = {}

    def check(self, conditions: list) -> list:
        if not conditions:
            raise InputError("give at least one condition")
        return list(conditions)

    def example(self, n: int) -> list:
        """n conditions that give images of this bundle (bench's generations, the export's checks)."""
        return [None] * n

    def cond(self, conditions: list, guidance: float, size_scale: float = 1.0) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs; size_scale: image size / native (SDXL's time_ids say the size)."""
        return {}

    def uncond(self, batch: int, size_scale: float = 1.0) -> dict[str, np.ndarray] | None:
        return None

    def describe(self, condition) -> str:
        """A file-name-safe word for one condition."""
        return "sample"


class Unconditional(Conditioning):
    pass


class Prompts(Conditioning):
    condition_kind = "prompt"

    def __init__(self, spec: dict, runtime_dir: Path):
        super().__init__(spec, runtime_dir)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendMissing("the tokenizers library is not installed here: pip install tokenizers") from None
        self.encoders = spec["encoders"]
        self.tokenizers = []
        for enc in self.encoders:
            path = runtime_dir / enc["tokenizer"]
            if not path.is_file():
                raise InputError(f"{path} is missing: this bundle's runtime files are incomplete, re-export it")
            self.tokenizers.append(Tokenizer.from_file(str(path)))
        self.components = tuple(e["component"] for e in self.encoders)
        self.guided = bool(spec.get("guided", True))
        self.time_ids = spec.get("time_ids")
        self.timestep_cond_dim = int(spec.get("timestep_cond_dim") or 0)
        self.zeros_uncond = spec.get("null") == "zeros"

    def check(self, conditions: list) -> list:
        if not conditions:
            raise InputError('give at least one prompt (--prompt "...")')
        bad = [c for c in conditions if not isinstance(c, str)]
        if bad:
            raise InputError(f"a prompt must be text, got {bad[0]!r}")
        return list(conditions)

    def example(self, n: int) -> list:
        return (list(self.spec.get("example_prompts") or ["a photograph"]) * n)[:n]

    def token_ids(self, index: int, prompts: list[str]) -> np.ndarray:
        """[B, max_length] int32 ids of the index-th tokenizer, as the pipeline's CLIPTokenizer gives them."""
        return np.array([e.ids for e in self.tokenizers[index].encode_batch(list(prompts))], dtype=np.int32)

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        contexts, pooled = [], None
        for i, enc in enumerate(self.encoders):
            out = self.runners[enc["component"]]({"input_ids": self.token_ids(i, prompts)})
            contexts.append(out[enc["context"]])
            if enc.get("pooled"):
                pooled = out[enc["pooled"]]
        context = contexts[0] if len(contexts) == 1 else np.concatenate(contexts, axis=-1)
        return context.astype(np.float32), pooled

    def _feeds(self, context: np.ndarray, pooled: np.ndarray | None, size_scale: float) -> dict[str, np.ndarray]:
        feed = {"encoder_hidden_states": context}
        if pooled is not None:
            feed["text_embeds"] = pooled.astype(np.float32)
        if self.time_ids is not None:  # (original size, crop top-left, target size): no crop, so all scale alike
            time_ids = np.asarray(self.time_ids, dtype=np.float32) * np.float32(size_scale)
            feed["time_ids"] = np.tile(time_ids, (len(context), 1))
        return feed

    def cond(self, conditions: list, guidance: float, size_scale: float = 1.0) -> dict[str, np.ndarray]:
        feed = self._feeds(*self._encode(conditions), size_scale)
        if self.timestep_cond_dim:
            w = np.full((len(conditions),), guidance - 1, dtype=np.float32)
            feed["timestep_cond"] = guidance_embedding(w, self.timestep_cond_dim)
        return feed

    def uncond(self, batch: int, size_scale: float = 1.0) -> dict[str, np.ndarray] | None:
        if not self.guided:
            return None
        context, pooled = self._encode([""])
        if self.zeros_uncond:
            context = np.zeros_like(context)
            pooled = None if pooled is None else np.zeros_like(pooled)
        feed = self._feeds(context, pooled, size_scale)
        return {k: np.repeat(v, batch, axis=0) for k, v in feed.items()}

    def describe(self, condition) -> str:
        words = "".join(c if c.isalnum() else "-" for c in condition.lower()).strip("-")
        return "-".join(w for w in words.split("-") if w)[:40] or "empty"


KINDS = {"text": Prompts, "none": Unconditional}


def make_conditioning(shapes: dict, runtime_dir: Path) -> Conditioning:
    spec = shapes.get("conditioning")
    if spec is None:  # the class-conditioned demo's bundles, from before the families
        raise InputError(f"{runtime_dir}: this bundle is of the retired class-conditioned demo: re-export it with "
                         "this tinyprune")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise InputError(f"{runtime_dir}: conditioning {kind!r} is not one this runtime knows ({', '.join(KINDS)}): "
                         "a newer tinyprune made this bundle")
    return KINDS[kind](spec, runtime_dir)
