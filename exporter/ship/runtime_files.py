"""Export side of the torch-free runtime: what a bundle's runtime/ dir holds, and the runtime-vs-PyTorch drift.

runtime/
  scheduler_config.json   the pipeline's scheduler config (diffusers keys) the numpy schedulers are built from
  conditioning.npz        the arrays the family adapter's runtime_conditioning() gives (what the runtime conditions
                          the UNet with)
  shapes.json             latent channels and size, VAE scale, image size and channels, and the family's own entries
  README.md               the exact commands that run the bundle on a device
  tinyprune/runtime/      a copy of the runtime package, whole (numpy + onnxruntime only; it imports nothing outside
                          itself), so that `cd BUNDLE/runtime && python -m tinyprune.runtime ..` works without
                          tinyprune installed

Every file is written byte-for-byte deterministically (the npz with a fixed zip timestamp), so that the same
inputs still give identical bundles.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from tinyprune import __version__
import tinyprune.runtime as _runtime_package
from tinyprune.runtime.generate import CONDITIONING_FILE, RUNTIME_DIR, SCHEDULER_FILE, SHAPES_FILE

RUNTIME_PACKAGE = Path(_runtime_package.__file__).parent

README = """# Running this bundle on the device (no PyTorch needed)

The runtime needs Python 3.10+, numpy, pillow and onnxruntime (or TensorRT engines built with
`build/build_engines.sh`, for `--backend trt`).

```bash
pip install onnxruntime numpy pillow          # onnxruntime-gpu for --backend ort-cuda
cd {bundle}/runtime
python -m tinyprune.runtime .. --class 3 --steps 20 --seed 0 --out imgs
```

That writes `imgs/00_class3_seed0.png` ({size}x{size} RGB). Repeat `--class` for more images;
`--scheduler ddim|euler` (default: {default_scheduler}), `--guidance 3.0`, `--backend ort-cpu|ort-cuda|trt`,
`--npy` also writes the float images. The same seed gives the same image.

Where tinyprune is installed, the same loop is

```bash
tinyprune generate {bundle} --class 3 --steps 20 --seed 0 --out imgs
python -m tinyprune.runtime {bundle} --class 3 --steps 20 --seed 0 --out imgs
```

What the loop does: initial noise `numpy.random.default_rng(seed).standard_normal((B, {channels}, {latent}, {latent}))`,
class conditioning from `conditioning.npz` (row {null} is the null class for classifier-free guidance; the UNet
runs on the batch [uncond, cond]), {steps_note}, then `vae_decoder/model.onnx` on `latents / {scaling}` and
`image / 2 + 0.5`.
Files: `runtime/scheduler_config.json`, `runtime/conditioning.npz`, `runtime/shapes.json`; code in
`runtime/tinyprune/runtime/` (tinyprune {version}).
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
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        **pipe.family.runtime_conditioning()[1],
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
    (rt / CONDITIONING_FILE).write_bytes(_npz_bytes(pipe.family.runtime_conditioning()[0]))
    shapes = runtime_shapes(pipe)
    (rt / SHAPES_FILE).write_text(json.dumps(shapes, indent=2, sort_keys=True) + "\n")
    default = {"EulerDiscreteScheduler": "euler"}.get(sched["_class_name"], "ddim")
    steps_note = ("DDIM steps (eta 0)" if default == "ddim" else "Euler steps") + \
        f" from `scheduler_config.json` ({sched.get('beta_schedule')}, timestep_spacing {sched.get('timestep_spacing')})"
    (rt / "README.md").write_text(README.format(
        bundle="BUNDLE", size=shapes["image_size"], default_scheduler=default, channels=shapes["latent_channels"],
        latent=shapes["latent_size"], null=shapes["num_classes"], steps_note=steps_note, version=__version__,
        scaling=shapes["scaling_factor"]))
    code = rt / "tinyprune"
    code.mkdir(exist_ok=True)
    (code / "__init__.py").write_text(f'"""tinyprune\'s torch-free runtime, copied into the bundle."""\n\n'
                                      f'__version__ = "{__version__}"\n')
    for src in sorted(runtime_package_files()):
        dst = code / "runtime" / src.relative_to(RUNTIME_PACKAGE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return rt


def runtime_package_files() -> list[Path]:
    """The runtime package's source files: the folder is import-closed (tests/test_runtime.py checks it)."""
    return [p for p in RUNTIME_PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
