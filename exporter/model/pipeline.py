"""Load and save diffusers pipelines from local dirs (safetensors only), and the default pipeline.

A pipeline dir is diffusers' layout: model_index.json, unet/, scheduler/, and what its family adapter
(model/families/) names: the latent codec (vae/ or vqvae/, none in pixel space) and the conditioning parts (text
encoders and tokenizers). Every component is loaded with diffusers' and
transformers' own `from_pretrained(use_safetensors=True)` from the local dir; pickle weights are refused before
anything is read, and parts that cannot work together (a text encoder of the wrong width) are refused from their
config.json before any weight is. The scheduler is loaded as the class its config names, so a bundle records
the pipeline's own scheduler.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch

from tinyprune.errors import InputError, TinypruneError
from tinyprune.model.families import Family, family_for

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDPMScheduler",
              "PNDMScheduler", "DPMSolverMultistepScheduler", "LCMScheduler")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer's file, or a CLIP BPE vocabulary


@dataclass
class Pipeline:
    """A loaded pipeline: the denoiser, its scheduler, the latent codec (None in pixel space) and the family's
    conditioning parts by component name (text_encoder, tokenizer, ...)."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler: object
    parts: dict
    index: dict
    root: Path | None = None

    @property
    def noise_scheduler(self):
        """The forward (noising) process the UNet was trained with, whatever sampler the pipeline ships: what
        calibration batches, scores and recovery noise with (as diffusers' training scripts use DDPMScheduler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    @cached_property
    def family(self) -> Family:
        """The adapter through which every stage outside model/ conditions, encodes, decodes and exports."""
        return family_for(self.index, str(self.root or "pipeline"))(self)

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale(self) -> int:
        return self.family.latents.scale

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale

    @property
    def unet_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    @property
    def conditioner(self):
        """The first conditioning part (the first text encoder); None when unconditional."""
        return next((m for m in self.parts.values() if isinstance(m, torch.nn.Module)), None)

    def models(self) -> dict[str, torch.nn.Module]:
        """Every torch model of the pipeline by the name its weights are known by (unet, vae, text_encoder..)."""
        out = {"unet": self.unet, **({"vae": self.vae} if self.vae is not None else {})}
        return out | {k: m for k, m in self.parts.items() if isinstance(m, torch.nn.Module)}

    def eval(self) -> "Pipeline":
        for m in self.models().values():
            m.eval().requires_grad_(False)
        return self


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


def _check_weights(sub: Path) -> None:
    """Refuse pickle-only or weightless component dirs before diffusers touches them."""
    names = [p.name for p in sub.iterdir()] if sub.is_dir() else []
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise InputError(
            f"{sub} holds only pickle weights ({pickles[0]}); tinyprune loads safetensors only because "
            "unpickling can run arbitrary code: convert them to safetensors on a machine you trust"
        )
    raise InputError(f"{sub} has no weights (no .safetensors file)")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _component_dir(root: Path, name: str) -> Path:
    sub = root / name
    if not sub.is_dir():
        raise InputError(f"{root} is not a complete pipeline: component dir '{name}/' is missing")
    return sub


def _config(root: Path, name: str) -> dict:
    return _read_json(_component_dir(root, name) / "config.json")


def _load_component(cls, root: Path, name: str):
    sub = root / name
    _config(root, name)
    _check_weights(sub)
    try:
        return cls.from_pretrained(sub, use_safetensors=True, local_files_only=True)
    except InputError:
        raise
    except MemoryError:  # exit 1, as a full disk: the run failed on this machine, the input may be fine
        raise TinypruneError(f"{sub}: not enough memory to load these weights here (the file is not the "
                             "problem): free memory or use a machine with more") from None
    except Exception as e:  # diffusers and transformers raise many kinds for a truncated or mismatched file
        first = _first_line(e)
        if "expected shape" in first or "size mismatch" in first:
            raise InputError(f"{sub}: weights do not fit the shapes its config.json builds: a channel-pruned "
                             f"UNet needs its structure.json, which is missing ({first[:160]})") from None
        raise InputError(f"{sub}: weights could not be loaded, corrupt or truncated? ({first[:200]})") from None


def _load_tokenizer(cls, root: Path, name: str):
    sub = _component_dir(root, name)
    if not any((sub / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{sub} holds no tokenizer ({' or '.join(TOKENIZER_FILES)} is missing)")
    try:
        return cls.from_pretrained(sub, local_files_only=True)
    except Exception as e:
        raise InputError(f"{sub}: tokenizer could not be loaded ({_first_line(e)[:200]})") from None


def _load_structured_unet(sub: Path):
    """A channel-pruned UNet (tinyprune --method diff-pruning|ld-pruner|ecodiff): config.json builds the
    dense shapes, structure.json shrinks them, then the safetensors weights load strictly (no pickle)."""
    from tinyprune.model.structure import load_structured_unet

    _read_json(sub / "config.json")
    _check_weights(sub)
    try:
        return load_structured_unet(sub)
    except Exception as e:
        raise InputError(f"{sub}: channel-pruned UNet could not be rebuilt from structure.json and its weights "
                         f"({type(e).__name__}: {str(e).strip()[:200]})") from None


def _entry_class(index: dict, name: str, allowed: tuple[str, ...], where: str) -> type:
    """The diffusers class model_index.json names for a component, if it is one the family takes."""
    import diffusers

    entry = index.get(name)
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if cls not in allowed:
        raise InputError(f"{where}: component '{name}' is {cls or 'not listed'}; this family takes "
                         f"{' or '.join(allowed)}")
    return getattr(diffusers, cls)


def load_pipeline(model_dir: str | Path) -> Pipeline:
    root = Path(model_dir)
    if not root.exists():
        raise InputError(f"model dir {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is a file; --model expects a diffusers pipeline directory")
    if not (root / "model_index.json").is_file():
        raise InputError(f"{root} is not a diffusers pipeline: model_index.json is missing")
    index = _read_json(root / "model_index.json")

    def require(*names):
        for name in names:
            if not isinstance(index.get(name), list) or not index[name][1]:
                raise InputError(f"{root}/model_index.json lists no '{name}' component")

    require("unet", "scheduler")  # every diffusion pipeline has these; what else it needs is its family's
    family = family_for(index, str(root))
    require(*([family.VAE] if family.VAE else []), *family.PARTS)
    unet_cls = _entry_class(index, "unet", (family.UNET,), str(root))
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    if sched_cfg.get("_class_name") not in SCHEDULERS:
        raise InputError(f"{root}/scheduler: unsupported scheduler {sched_cfg.get('_class_name')!r}; "
                         f"supported: {', '.join(SCHEDULERS)}")
    configs = {name: _config(root, name) for name in ("unet", *family.PARTS) if name not in family.tokenizers()}
    family.check_configs(configs, str(root))
    import diffusers

    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    if (root / "unet" / "structure.json").is_file():  # channel-pruned: shapes from unet/structure.json
        unet = _load_structured_unet(root / "unet")
    else:
        unet = _load_component(unet_cls, root, "unet")
    vae = None
    if family.VAE:
        vae = _load_component(_entry_class(index, family.VAE, family.VAE_CLASSES, str(root)), root, family.VAE)
    parts = {}
    for name in family.PARTS:
        cls = family.part_class(name)
        loader = _load_tokenizer if name in family.tokenizers() else _load_component
        parts[name] = loader(cls, root, name)
    return Pipeline(unet, vae, scheduler, parts, index, root).eval()


def save_pipeline(pipe: Pipeline, out: Path) -> None:
    """diffusers' layout: what diffusers' own from_pretrained loads, components tinyprune does not carry (a
    safety checker) listed as absent."""
    out.mkdir(parents=True, exist_ok=True)
    family = pipe.family
    pipe.unet.save_pretrained(out / "unet", safe_serialization=True)
    if getattr(pipe.unet, "tinyprune_structure", None):  # channel-pruned: the shapes reload needs
        from tinyprune.model.structure import save_structure

        save_structure(pipe.unet, out / "unet")
    if pipe.vae is not None:
        pipe.vae.save_pretrained(out / family.VAE, safe_serialization=True)
    for name, part in pipe.parts.items():
        if isinstance(part, torch.nn.Module):
            part.save_pretrained(out / name, safe_serialization=True)
        else:
            part.save_pretrained(out / name)
    pipe.scheduler.save_pretrained(out / "scheduler")
    from tinyprune.model.families.text import PROMPTS_FILE

    if pipe.root is not None and (pipe.root / PROMPTS_FILE).is_file():  # the pipeline's own prompts travel with it
        shutil.copyfile(pipe.root / PROMPTS_FILE, out / PROMPTS_FILE)
    kept = {"unet", "scheduler", family.VAE, *pipe.parts}
    index = {k: (v if k.startswith("_") or k in kept or not isinstance(v, list) else [None, None])
             for k, v in pipe.index.items()}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def tree_sha256(root: Path) -> str:
    """One hash over every file of a dir (relative path + content), independent of where it lies."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def demo_dir() -> Path:
    return Path(str(resources.files("tinyprune.demo").joinpath("pipeline")))

