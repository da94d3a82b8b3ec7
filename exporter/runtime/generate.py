"""The bundle's own generation loop, torch-free: numpy schedulers + onnxruntime (or TensorRT) -> PNGs.

What it needs from the bundle: the ONNX files of unet/, vae_decoder/ (none in pixel space) and the text
encoders a text family conditions with (or build/<component>.engine for TensorRT), and runtime/
(scheduler_config.json, shapes.json with the family's "conditioning" entry, the tokenizers'
JSON; see ship/runtime_files.py and conditioning.py). It reproduces tinyprune.model.sampling.sample: the same
initial noise from numpy's generator, the family's conditioning with classifier-free guidance where it guides
(UNet batch [uncond, cond]), the bundle's scheduler (or --scheduler), VAE decode (latents / scaling_factor into
vae_decoder's latent_sample, as diffusers' ONNX pipelines feed it), images in [0, 1]. Stochastic schedulers
draw their noise from the same generator, after the initial noise.

Imports numpy and onnxruntime only (tokenizers for prompts, pillow to write PNGs, tensorrt lazily for
--backend trt); never torch, transformers or diffusers, so it runs on a device that has none of them:

    python -m tinyprune.runtime BUNDLE --prompt "a red bicycle" --steps 20 --seed 0 --out imgs
    python -m tinyprune.runtime BUNDLE --num-images 4        (unconditional families)
    python -m tinyprune.runtime bench BUNDLE --out bench.json

Every bundle carries a copy of this whole package in runtime/tinyprune/runtime/, so the same commands also work
from BUNDLE/runtime without tinyprune installed.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import BackendMissing, InputError, TinypruneError
from .conditioning import make_conditioning
from .schedulers import KINDS, make_scheduler
from .runners import OrtRunner, Runner

BACKENDS = ("ort-cpu", "ort-cuda", "trt")
RUNTIME_DIR = "runtime"
SCHEDULER_FILE = "scheduler_config.json"
SHAPES_FILE = "shapes.json"
DEFAULT_STEPS = 20


def initial_noise(seed: int, batch: int, channels: int, size: int) -> np.ndarray:
    """Bit for bit tinyprune.model.sampling.initial_noise (which this module cannot import: it imports torch)."""
    return np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, rounded like diffusers' numpy_to_pil."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


MISSING_RUNTIME = "this bundle has no runtime files (made by a tinyprune before the runtime covered its family): re-export it"


def read_json(path: Path, missing: str = MISSING_RUNTIME) -> dict:
    """A bundle's JSON file, or one line: `missing` when it is absent, the parse error when it is not JSON."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendMissing("onnxruntime is not installed here: pip install onnxruntime") from None
    return ort.get_available_providers()


def make_runner(bundle: Path, component: str, backend: str, threads: int = 0) -> Runner:
    """A runner for one component of the bundle on one backend; BackendMissing when it is not here."""
    bundle = Path(bundle)
    if backend == "ort-cpu":
        ort_providers()
        return OrtRunner(bundle / component / "model.onnx", ("CPUExecutionProvider",), threads)
    if backend == "ort-cuda":
        if "CUDAExecutionProvider" not in ort_providers():
            raise BackendMissing("onnxruntime here has no CUDAExecutionProvider: pip install onnxruntime-gpu "
                                 "on a machine with CUDA")
        return OrtRunner(bundle / component / "model.onnx", ("CUDAExecutionProvider", "CPUExecutionProvider"), threads)
    if backend == "trt":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            raise BackendMissing("tensorrt is not installed here: pip install 'tinyprune[trt]' (or use the "
                                 "device's JetPack TensorRT)")
        from .trt import TrtRunner

        return TrtRunner(bundle / "build" / f"{component}.engine")
    raise InputError(f"unknown backend {backend!r}; the runtime has: {', '.join(BACKENDS)}")


def decoder_of(shapes: dict) -> str | None:
    """The decoder component (None in pixel space; bundles from before the families always had vae_decoder)."""
    return shapes.get("decoder", "vae_decoder")


def components_of(shapes: dict) -> tuple[str, ...]:
    """The components a bundle's loop runs, in call order: text encoders, unet, the decoder (if any)."""
    encoders = shapes.get("conditioning", {}).get("encoders", ())
    decoder = decoder_of(shapes)
    return (*(e["component"] for e in encoders), "unet", *((decoder,) if decoder else ()))


def runtime_components(bundle: str | Path) -> tuple[str, ...]:
    return components_of(read_json(Path(bundle) / RUNTIME_DIR / SHAPES_FILE))


class Runtime:
    """Loads a bundle's runtime files; with it (a context manager), generate(conditions, ...) -> images [B, 3, H, W].

    conditions: prompts or None placeholders, as the bundle's conditioning takes them (see
    conditions()). runners: {component: Runner} to use instead of the backend's own (bench passes PyTorch runners
    this way, so every backend is timed through this same loop). one_at_a_time: each phase (text encoders, UNet,
    decoder) loads its runners and releases them after it, where all are otherwise loaded at once: what one
    generate() call needs at the least memory (at Stable Diffusion 1.5's size the text encoder's and decoder's
    sessions beside the UNet's are 0.7 GiB), at the cost of loading them again at every call.
    """

    def __init__(self, bundle: str | Path, backend: str = "ort-cpu", threads: int = 0,
                 runners: dict[str, Runner] | None = None, one_at_a_time: bool = False):
        self.bundle = Path(bundle)
        if not self.bundle.is_dir():
            raise InputError(f"bundle {self.bundle} does not exist or is not a directory")
        rt = self.bundle / RUNTIME_DIR
        self.scheduler_config = read_json(rt / SCHEDULER_FILE)
        self.shapes = read_json(rt / SHAPES_FILE)
        self.conditioning = make_conditioning(self.shapes, rt)
        self.components = components_of(self.shapes)
        self.decoder = decoder_of(self.shapes)
        self.backend = backend
        given = runners or {}
        self.runners = {c: given[c] if c in given else make_runner(self.bundle, c, backend, threads)
                        for c in self.components}
        self.conditioning.runners = self.runners
        self.max_batch = self._max_batch() if backend == "trt" else None
        self.one_at_a_time = one_at_a_time

    def _max_batch(self) -> int | None:
        """TensorRT engines take batches up to their profile's max: from the manifest's min/opt/max shapes."""
        try:
            manifest = json.loads((self.bundle / "manifest.json").read_text())
            return int(manifest["components"]["unet"]["inputs"]["sample"]["max"][0])
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self):
        if not self.one_at_a_time:  # else each phase loads its own (_phase)
            for r in self.runners.values():
                r.activate()

    @contextmanager
    def _phase(self, components):
        """The runners of one phase, loaded for it and released after it when one_at_a_time."""
        runners = [self.runners[c] for c in components] if self.one_at_a_time else []
        for r in runners:
            r.activate()
        try:
            yield
        finally:
            for r in runners:
                r.deactivate()

    def deactivate(self):
        for r in self.runners.values():
            r.deactivate()

    def conditions(self, prompts: list[str] | None = None, num_images: int = 1) -> list:
        """The conditions of one command line: the prompts, each num_images times, for a bundle that takes them;
        num_images placeholders for an unconditional bundle."""
        if num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {num_images}")
        kind = self.conditioning.condition_kind
        if prompts and kind != "prompt":
            raise InputError(f"this bundle's model is {self.shapes.get('family', kind)}, it takes --num-images N "
                             "only, not --prompt")
        base = prompts or ([None] if kind == "none" else [])
        return self.conditioning.check([c for c in base for _ in range(num_images)])

    def denoise(self, conditions: list, seed: int = 0, steps: int = DEFAULT_STEPS, scheduler: str | None = None,
                guidance: float | None = None, callback=None, size: int | None = None) -> np.ndarray:
        """The final scaled latents [B, C, h, w]. callback(done, total) after every UNet step. size: the latent
        size (None: the model's native one; the files' dynamic axes take others)."""
        cond_of = self.conditioning
        conditions = cond_of.check(conditions)
        guidance = cond_of.default_guidance if guidance is None else guidance
        sched = make_scheduler(self.scheduler_config, scheduler)
        timesteps = sched.set_timesteps(steps)
        c, native = self.shapes["latent_channels"], self.shapes["latent_size"]
        size = size or native
        rng = np.random.default_rng(seed)  # its first draw is initial_noise(seed, ...); scheduler noise follows
        noise = rng.standard_normal((len(conditions), c, size, size)).astype(np.float32)
        pairs = 2 if cond_of.guided else 1
        chunk = max(1, self.max_batch // pairs) if self.max_batch else len(conditions)
        out, done, total = [], 0, len(timesteps) * -(-len(conditions) // chunk)  # PNDM: steps + 1 calls
        chunks = []
        with self._phase([c for c in self.components if c not in ("unet", self.decoder)]):  # the text encoders
            for lo in range(0, len(conditions), chunk):
                part = conditions[lo:lo + chunk]
                feeds = cond_of.cond(part, guidance, size / native)
                uncond = cond_of.uncond(len(part), size / native) if cond_of.guided else None
                if uncond is not None:
                    feeds = {k: np.concatenate([uncond[k], feeds[k]]) for k in feeds}
                chunks.append((lo, part, feeds))
        unet = self.runners["unet"]
        with self._phase(["unet"]):
            for lo, part, feeds in chunks:
                latents = noise[lo:lo + chunk] * np.float32(sched.init_noise_sigma)
                n = pairs * len(part)
                for i, t in enumerate(timesteps):
                    x = sched.scale_model_input(latents if pairs == 1 else np.concatenate([latents, latents]), i)
                    eps = unet({"sample": np.ascontiguousarray(x, dtype=np.float32),
                                "timestep": np.full((n,), t, dtype=np.float32), **feeds})["out_sample"]
                    if pairs == 2:
                        eps_u, eps_c = eps[: len(part)], eps[len(part):]
                        eps = eps_u + np.float32(guidance) * (eps_c - eps_u)
                    latents = sched.step(eps, i, latents, rng)
                    done += 1
                    if callback:
                        callback(done, total)
                out.append(latents)
        return np.concatenate(out)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> images in [0, 1], [B, 3, H, W] float32 (pixel space: the latents are the images)."""
        if self.decoder is None:
            return np.clip(latents / 2 + 0.5, 0, 1).astype(np.float32)
        if "scaling_factor" not in self.shapes:
            raise InputError(f"{self.bundle} was made by a tinyprune whose vae_decoder took scaled latents: re-export it")
        chunk = min(self.max_batch or len(latents), len(latents))
        vae = self.runners[self.decoder]
        unscaled = latents / np.float32(self.shapes["scaling_factor"])
        with self._phase([self.decoder]):
            images = [vae({"latent_sample": np.ascontiguousarray(unscaled[lo:lo + chunk], dtype=np.float32)})["sample"]
                      for lo in range(0, len(latents), chunk)]
        return np.clip(np.concatenate(images) / 2 + 0.5, 0, 1)

    def generate(self, conditions: list, seed: int = 0, steps: int = DEFAULT_STEPS, scheduler: str | None = None,
                 guidance: float | None = None, callback=None, size: int | None = None) -> np.ndarray:
        return self.decode(self.denoise(conditions, seed, steps, scheduler, guidance, callback, size))


def save_pngs(images: np.ndarray, names: list[str], seed: int, out: Path) -> list[str]:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, name) in enumerate(zip(to_uint8(images), names)):
        path = out / f"{i:02d}_{name}_seed{seed}.png"
        Image.fromarray(img).save(path, format="PNG")
        files.append(str(path))
    return files


def generate_to_dir(bundle: str | Path, out: str | Path, prompts: list[str] | None = None, num_images: int = 1,
                    steps: int = DEFAULT_STEPS, seed: int = 0,
                    scheduler: str | None = None, guidance: float | None = None, backend: str = "ort-cpu",
                    threads: int = 0, progress=None, save_npy: bool = False) -> dict:
    """`tinyprune generate` / `python -m tinyprune.runtime`: PNGs (and images.npy if asked) in `out`."""
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    rt = Runtime(bundle, backend, threads)
    conditions = rt.conditions(prompts, num_images)
    sched = make_scheduler(rt.scheduler_config, scheduler)
    guidance = rt.conditioning.default_guidance if guidance is None else guidance
    t0 = time.perf_counter()
    with rt:
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        latents = rt.denoise(conditions, seed, steps, scheduler, guidance, progress)
        t2 = time.perf_counter()
        images = rt.decode(latents)
        t3 = time.perf_counter()
    files = save_pngs(images, [rt.conditioning.describe(c) for c in conditions], seed, out)
    if save_npy:
        np.save(out / "images.npy", images.astype(np.float32))
    return {
        "bundle": str(bundle), "out": str(out), "files": files, "conditions": conditions, "seed": seed,
        "steps": steps, "scheduler": sched.name, "guidance": guidance, "backend": backend,
        "image_size": [int(images.shape[2]), int(images.shape[3])],
        "seconds": {"load": round(t_load, 4), "denoise": round(t2 - t1, 4), "decode": round(t3 - t2, 4),
                    "per_step": round((t2 - t1) / steps, 5)},
    }


def add_generation_options(p) -> None:
    """The options `python -m tinyprune.runtime` and its bench share."""
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=KINDS, default=None, help="default: the bundle's scheduler config class")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (an LCM's embedded guidance); default: the bundle's")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m tinyprune.runtime",
                                description="Generate images from a tinyprune bundle without PyTorch "
                                            "(`python -m tinyprune.runtime bench BUNDLE` times it).")
    add_generation_options(p)
    p.add_argument("--prompt", dest="prompts", action="append", help="prompt (text bundles); repeat for several")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (unconditional: in all)")
    p.add_argument("--out", default="images", help="output directory for the PNGs")
    p.add_argument("--npy", action="store_true", help="also write the float images as images.npy")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = p.parse_args(argv)

    def progress(done, total):
        if not args.quiet:
            print(f"step {done}/{total}", file=sys.stderr, flush=True)

    try:
        r = generate_to_dir(args.bundle, args.out, args.prompts, args.num_images, args.steps, args.seed,
                            args.scheduler, args.guidance, args.backend, args.threads, progress, args.npy)
    except TinypruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
