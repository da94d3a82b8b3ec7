"""Export side of the torch-free runtime: what a bundle's runtime/ dir holds, and the runtime-vs-PyTorch drift.

runtime/
  scheduler_config.json   the pipeline's scheduler config (diffusers keys) the numpy schedulers are built from
  conditioning.npz        the class embedding table (num_classes + 1 rows, the last is the null class), seq_len,
                          embed_dim, null_class
  shapes.json             latent channels and size, VAE scale, image size and channels, number of classes
  README.md               the exact commands that run the bundle on a device
  exporter/               a copy of the runtime's modules (numpy + onnxruntime only), so that
                          `cd BUNDLE/runtime && python -m exporter.runtime ..` works without tinyprune installed

Every file is written byte-for-byte deterministically (the npz with a fixed zip timestamp), so that the same
inputs still give identical bundles.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from . import __version__
from .runtime import CONDITIONING_FILE, RUNTIME_DIR, SCHEDULER_FILE, SHAPES_FILE

# The runtime's import closure (runtime.py imports errors, runners, np_schedulers; trt_runner lazily).
RUNTIME_MODULES = ("errors.py", "runners.py", "np_schedulers.py", "runtime.py", "trt_runner.py")
E2E_LABELS = 4  # labels in the runtime-vs-PyTorch check: a numerical check, a few images suffice

README = """# Running this bundle on the device (no PyTorch needed)

The runtime needs Python 3.10+, numpy, pillow and onnxruntime (or TensorRT engines built with
`build/build_engines.sh`, for `--backend trt`).

```bash
pip install onnxruntime numpy pillow          # onnxruntime-gpu for --backend ort-cuda
cd {bundle}/runtime
python -m exporter.runtime .. --class 3 --steps 20 --seed 0 --out imgs
```

That writes `imgs/00_class3_seed0.png` ({size}x{size} RGB). Repeat `--class` for more images;
`--scheduler ddim|euler` (default: {default_scheduler}), `--guidance 3.0`, `--backend ort-cpu|ort-cuda|trt`,
`--npy` also writes the float images. The same seed gives the same image.

Where tinyprune is installed, the same loop is

```bash
tinyprune generate {bundle} --class 3 --steps 20 --seed 0 --out imgs
python -m exporter.runtime {bundle} --class 3 --steps 20 --seed 0 --out imgs
```

What the loop does: initial noise `numpy.random.default_rng(seed).standard_normal((B, {channels}, {latent}, {latent}))`,
class conditioning from `conditioning.npz` (row {null} is the null class for classifier-free guidance; the UNet
runs on the batch [uncond, cond]), {steps_note}, then `vae_decoder/model.onnx` and `image / 2 + 0.5`.
Files: `runtime/scheduler_config.json`, `runtime/conditioning.npz`, `runtime/shapes.json`; code in
`runtime/exporter/` (tinyprune {version}).
"""


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez's format with a fixed timestamp (np.savez stamps the current time into the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(arr), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    return buf.getvalue()


def runtime_shapes(pipe) -> dict:
    return {
        "latent_channels": int(pipe.latent_channels),
        "latent_size": int(pipe.latent_size),
        "vae_scale": int(pipe.vae_scale),
        "image_size": int(pipe.latent_size * pipe.vae_scale),
        "image_channels": int(pipe.vae.config.out_channels),
        "num_classes": int(pipe.conditioner.config.num_classes),
    }


def write_runtime_dir(pipe, root: Path) -> Path:
    """Write root/runtime/ for the (pruned) pipeline `pipe` whose UNet and VAE decoder the bundle holds."""
    rt = Path(root) / RUNTIME_DIR
    rt.mkdir(parents=True, exist_ok=True)
    sched = dict(pipe.scheduler.config)
    sched["_class_name"] = type(pipe.scheduler).__name__
    sched = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sched.items() if not k.startswith("_") or
             k == "_class_name"}
    (rt / SCHEDULER_FILE).write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
    cfg = pipe.conditioner.config
    table = pipe.conditioner.embedding.weight.detach().float().cpu().numpy()
    (rt / CONDITIONING_FILE).write_bytes(_npz_bytes({
        "table": table.astype(np.float32), "seq_len": np.int64(cfg.seq_len), "embed_dim": np.int64(cfg.embed_dim),
        "null_class": np.int64(pipe.conditioner.null_class),
    }))
    shapes = runtime_shapes(pipe)
    (rt / SHAPES_FILE).write_text(json.dumps(shapes, indent=2, sort_keys=True) + "\n")
    default = {"EulerDiscreteScheduler": "euler"}.get(sched["_class_name"], "ddim")
    steps_note = ("DDIM steps (eta 0)" if default == "ddim" else "Euler steps") + \
        f" from `scheduler_config.json` ({sched.get('beta_schedule')}, timestep_spacing {sched.get('timestep_spacing')})"
    (rt / "README.md").write_text(README.format(
        bundle="BUNDLE", size=shapes["image_size"], default_scheduler=default, channels=shapes["latent_channels"],
        latent=shapes["latent_size"], null=shapes["num_classes"], steps_note=steps_note, version=__version__))
    code = rt / "exporter"
    code.mkdir(exist_ok=True)
    here = Path(__file__).parent
    (code / "__init__.py").write_text(f'"""tinyprune\'s torch-free runtime, copied into the bundle."""\n\n'
                                      f'__version__ = "{__version__}"\n')
    for name in RUNTIME_MODULES:
        (code / name).write_bytes((here / name).read_bytes())
    return rt


def prepare_runtime(pipe, root: Path, image_checks: int | None = None, steps: int | None = None):
    """Export time, while the PyTorch pipeline is still loaded: write root/runtime/ and return the PyTorch
    images the runtime is checked against later (runtime_check), or None when image checks are off (0)."""
    write_runtime_dir(pipe, root)
    return None if image_checks == 0 else torch_e2e_reference(pipe, steps, image_checks)


def runtime_check(bundle_dir: Path, ref, profile, what: str, steps: int | None = None) -> dict:
    """The report entry: runtime_drift(...).to_dict(), or a skipped entry (no gate) when ref is None or the
    bundle has no runtime/ (made by a tinyprune before the runtime existed)."""
    reason = None
    if ref is None:
        reason = "--image-checks 0"
    elif not (Path(bundle_dir) / RUNTIME_DIR / SHAPES_FILE).is_file():
        reason = "no runtime/ in this bundle: re-export it"
    if reason:
        return {"name": f"image runtime (ort-cpu) vs PyTorch, {what}", "psnr_db": "skipped", "max_abs": None,
                "min_psnr_db": profile.min_runtime_psnr_db, "ok": True, "skipped": True, "reason": reason}
    return runtime_drift(bundle_dir, ref, profile, what, steps).to_dict()


def check_dense_bundle(dense: str | Path, manifest: dict) -> Path:
    """validate --dense: a bundle of the same source pipeline exported with sparsity 0."""
    from .bundle import read_manifest
    from .errors import InputError

    dense = Path(dense)
    dm = read_manifest(dense)
    if dm.get("source", {}).get("sha256") != manifest["source"]["sha256"]:
        raise InputError(f"--dense {dense} was not made from the same source pipeline as the bundle")
    if dm.get("sparsity") not in (0, 0.0):
        raise InputError(f"--dense {dense} is not a dense bundle (sparsity {dm.get('sparsity')}); export one with "
                         "--sparsity 0")
    return dense


def e2e_labels(pipe, n: int | None = None) -> list[int]:
    """The first min(n, E2E_LABELS) class labels (n: the export's --image-checks)."""
    n = E2E_LABELS if n is None else min(n, E2E_LABELS)
    return list(range(min(n, pipe.conditioner.config.num_classes)))


def torch_e2e_reference(pipe, steps: int | None = None, n: int | None = None) -> np.ndarray:
    """The PyTorch pipeline's images for the runtime check (exporter.sampling.sample, DDIM, seed IMAGE_SEED)."""
    from .sampling import DEFAULT_STEPS, sample
    from .validate import IMAGE_SEED

    return sample(pipe, e2e_labels(pipe, n), seed=IMAGE_SEED, steps=steps or DEFAULT_STEPS).numpy()


def runtime_drift(bundle_dir: Path, ref: np.ndarray, profile, what: str, steps: int | None = None,
                  backend: str = "ort-cpu"):
    """The runtime's images (same seed, labels and initial noise, DDIM) against PyTorch's `ref`; an ImageDrift
    gated on profile.min_runtime_psnr_db."""
    from .compare import ImageDrift
    from .runtime import Runtime
    from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from .validate import IMAGE_SEED

    labels = list(range(len(ref)))
    with Runtime(bundle_dir, backend) as rt:
        got = rt.generate(labels, seed=IMAGE_SEED, steps=steps or DEFAULT_STEPS, scheduler="ddim",
                          guidance=DEFAULT_GUIDANCE)
    return ImageDrift.of(f"image runtime ({backend}) vs PyTorch, {what}", ref, got, profile.min_runtime_psnr_db)
