"""The bundle's own generation loop, torch-free: numpy schedulers + onnxruntime (or TensorRT) -> PNGs.

What it needs from the bundle: unet/model.onnx, vae_decoder/model.onnx (or build/<component>.engine for
TensorRT) and runtime/ (scheduler_config.json, conditioning.npz, shapes.json; see ship/runtime_files.py). It
reproduces tinyprune.model.sampling.sample: the same initial noise from numpy's generator, class conditioning
with a null class for classifier-free guidance (UNet batch [uncond, cond]), DDIM with eta 0 or Euler
steps, VAE decode (latents / scaling_factor into vae_decoder's latent_sample, as diffusers' ONNX pipelines feed
it), images in [0, 1].

Imports numpy and onnxruntime only (pillow to write PNGs, tensorrt lazily for --backend trt); never
torch or diffusers, so it runs on a device that has neither:

    python -m tinyprune.runtime BUNDLE --class 3 --steps 20 --seed 0 --out imgs

Every bundle carries a copy of this whole package in runtime/tinyprune/runtime/, so the same command also works
from BUNDLE/runtime without tinyprune installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import BackendMissing, InputError, TinypruneError
from .schedulers import make_scheduler
from .runners import OrtRunner, Runner

BACKENDS = ("ort-cpu", "ort-cuda", "trt")
RUNTIME_DIR = "runtime"
SCHEDULER_FILE = "scheduler_config.json"
CONDITIONING_FILE = "conditioning.npz"
SHAPES_FILE = "shapes.json"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def initial_noise(seed: int, batch: int, channels: int, size: int) -> np.ndarray:
    """Bit for bit tinyprune.model.sampling.initial_noise (which this module cannot import: it imports torch)."""
    return np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, rounded like diffusers' numpy_to_pil."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path} is missing: this bundle has no runtime files (the torch-free runtime generates "
                         "class-conditioned bundles only so far; a bundle older than the runtime: re-export it)")
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


class Runtime:
    """Loads a bundle's runtime files; with it (a context manager), generate(labels, ...) -> images [B, 3, H, W].

    runners: {"unet": Runner, "vae_decoder": Runner} to use instead of the backend's own (bench passes
    PyTorch runners this way, so every backend is timed through this same loop).
    """

    def __init__(self, bundle: str | Path, backend: str = "ort-cpu", threads: int = 0,
                 runners: dict[str, Runner] | None = None):
        self.bundle = Path(bundle)
        if not self.bundle.is_dir():
            raise InputError(f"bundle {self.bundle} does not exist or is not a directory")
        rt = self.bundle / RUNTIME_DIR
        self.scheduler_config = _read_json(rt / SCHEDULER_FILE)
        self.shapes = _read_json(rt / SHAPES_FILE)
        cond_path = rt / CONDITIONING_FILE
        if not cond_path.is_file():
            raise InputError(f"{cond_path} is missing: this bundle has no runtime files")
        with np.load(cond_path, allow_pickle=False) as cond:
            self.table = cond["table"].astype(np.float32)
            self.seq_len, self.embed_dim = int(cond["seq_len"]), int(cond["embed_dim"])
            self.null_class = int(cond["null_class"])
        self.num_classes = self.null_class
        self.backend = backend
        self.runners = runners or {c: make_runner(self.bundle, c, backend, threads) for c in ("unet", "vae_decoder")}
        self.max_batch = self._max_batch() if backend == "trt" else None

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
        for r in self.runners.values():
            r.activate()

    def deactivate(self):
        for r in self.runners.values():
            r.deactivate()

    def check_labels(self, labels: list[int]) -> list[int]:
        if not labels:
            raise InputError("give at least one class label (--class N)")
        bad = [c for c in labels if not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"class {bad[0]} is out of range: this model has classes 0..{self.num_classes - 1}")
        return list(labels)

    def context(self, labels: list[int]) -> np.ndarray:
        """[uncond..., cond...] cross-attention context, [2B, seq_len, embed_dim]."""
        ids = np.array([self.null_class] * len(labels) + list(labels), dtype=np.int64)
        return self.table[ids].reshape(len(ids), self.seq_len, self.embed_dim)

    def denoise(self, labels: list[int], seed: int = 0, steps: int = DEFAULT_STEPS, scheduler: str | None = None,
                guidance: float = DEFAULT_GUIDANCE, callback=None) -> np.ndarray:
        """The final scaled latents [B, C, h, w]. callback(done, total) after every UNet step."""
        labels = self.check_labels(labels)
        sched = make_scheduler(self.scheduler_config, scheduler)
        timesteps = sched.set_timesteps(steps)
        c, size = self.shapes["latent_channels"], self.shapes["latent_size"]
        noise = initial_noise(seed, len(labels), c, size)
        chunk = max(1, self.max_batch // 2) if self.max_batch else len(labels)
        out, done, total = [], 0, steps * -(-len(labels) // chunk)
        unet = self.runners["unet"]
        for lo in range(0, len(labels), chunk):
            part = labels[lo:lo + chunk]
            latents = noise[lo:lo + chunk] * sched.init_noise_sigma
            context = self.context(part)
            for i, t in enumerate(timesteps):
                x = sched.scale_model_input(np.concatenate([latents, latents]), i)
                feed = {"sample": np.ascontiguousarray(x, dtype=np.float32),
                        "timestep": np.full((2 * len(part),), t, dtype=np.float32),
                        "encoder_hidden_states": context}
                eps = unet(feed)["out_sample"]
                eps_u, eps_c = eps[: len(part)], eps[len(part):]
                latents = sched.step(eps_u + guidance * (eps_c - eps_u), i, latents)
                done += 1
                if callback:
                    callback(done, total)
            out.append(latents)
        return np.concatenate(out)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> images in [0, 1], [B, 3, H, W] float32."""
        if "scaling_factor" not in self.shapes:
            raise InputError(f"{self.bundle} was made by a tinyprune whose vae_decoder took scaled latents: re-export it")
        chunk = min(self.max_batch or len(latents), len(latents))
        vae = self.runners["vae_decoder"]
        unscaled = latents / np.float32(self.shapes["scaling_factor"])
        images = [vae({"latent_sample": np.ascontiguousarray(unscaled[lo:lo + chunk], dtype=np.float32)})["sample"]
                  for lo in range(0, len(latents), chunk)]
        return np.clip(np.concatenate(images) / 2 + 0.5, 0, 1)

    def generate(self, labels: list[int], seed: int = 0, steps: int = DEFAULT_STEPS, scheduler: str | None = None,
                 guidance: float = DEFAULT_GUIDANCE, callback=None) -> np.ndarray:
        return self.decode(self.denoise(labels, seed, steps, scheduler, guidance, callback))


def save_pngs(images: np.ndarray, labels: list[int], seed: int, out: Path) -> list[str]:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, label) in enumerate(zip(to_uint8(images), labels)):
        path = out / f"{i:02d}_class{label}_seed{seed}.png"
        Image.fromarray(img).save(path, format="PNG")
        files.append(str(path))
    return files


def generate_to_dir(bundle: str | Path, labels: list[int], out: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0,
                    scheduler: str | None = None, guidance: float = DEFAULT_GUIDANCE, backend: str = "ort-cpu",
                    threads: int = 0, progress=None, save_npy: bool = False) -> dict:
    """`tinyprune generate` / `python -m tinyprune.runtime`: PNGs (and images.npy if asked) in `out`."""
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    rt = Runtime(bundle, backend, threads)
    labels = rt.check_labels(labels)
    kind = scheduler or None
    t0 = time.perf_counter()
    with rt:
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        latents = rt.denoise(labels, seed, steps, kind, guidance, progress)
        t2 = time.perf_counter()
        images = rt.decode(latents)
        t3 = time.perf_counter()
    files = save_pngs(images, labels, seed, out)
    if save_npy:
        np.save(out / "images.npy", images.astype(np.float32))
    sched = make_scheduler(rt.scheduler_config, kind)
    return {
        "bundle": str(bundle), "out": str(out), "files": files, "labels": labels, "seed": seed, "steps": steps,
        "scheduler": sched.name, "guidance": guidance, "backend": backend,
        "image_size": [int(images.shape[2]), int(images.shape[3])],
        "seconds": {"load": round(t_load, 4), "denoise": round(t2 - t1, 4), "decode": round(t3 - t2, 4),
                    "per_step": round((t2 - t1) / steps, 5)},
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tinyprune.runtime",
                                description="Generate images from a tinyprune bundle without PyTorch.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--class", dest="labels", type=int, action="append", required=True,
                   help="class label; repeat for several images")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=("ddim", "euler"), default=None,
                   help="default: the bundle's scheduler config class")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--out", default="images", help="output directory for the PNGs")
    p.add_argument("--npy", action="store_true", help="also write the float images as images.npy")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = p.parse_args(argv)

    def progress(done, total):
        if not args.quiet:
            print(f"step {done}/{total}", file=sys.stderr, flush=True)

    try:
        r = generate_to_dir(args.bundle, args.labels, args.out, args.steps, args.seed, args.scheduler,
                            args.guidance, args.backend, args.threads, progress, args.npy)
    except TinypruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
