"""Export side of the torch-free runtime: what a bundle's runtime/ dir holds, and the runtime-vs-PyTorch drift.

runtime/
  scheduler_config.json   the pipeline's scheduler config (diffusers keys) the numpy schedulers are built from
  shapes.json             latent channels and size, VAE scale and scaling factor, image size and channels, the
                          decoder component (null in pixel space), and "conditioning": how the family conditions
                          the UNet (runtime/conditioning.py reads it)
  tokenizer.json [tokenizer_2.json]   text families: the tokenizers as `tokenizers` JSON, padding and truncation
                          to the text encoder's length set inside
  README.md               the exact commands that run the bundle on a device
  tinyprune/runtime/      a copy of the runtime package, whole (numpy + onnxruntime only; it imports nothing outside
                          itself), so that `cd BUNDLE/runtime && python -m tinyprune.runtime ..` works without
                          tinyprune installed

Every file is written byte-for-byte deterministically, so that the same inputs still give identical bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinyprune import __version__
import tinyprune.runtime as _runtime_package
from tinyprune.runtime.generate import RUNTIME_DIR, SCHEDULER_FILE, SHAPES_FILE
from tinyprune.runtime.schedulers import KINDS, make_scheduler

RUNTIME_PACKAGE = Path(_runtime_package.__file__).parent

README = """# Running this bundle on the device (no PyTorch needed)

The runtime needs Python 3.10+, numpy, pillow{needs} and onnxruntime (or TensorRT engines built with
`build/build_engines.sh`, for `--backend trt`).

```bash
pip install onnxruntime numpy pillow{pip}          # onnxruntime-gpu for --backend ort-cuda
cd {bundle}/runtime
python -m tinyprune.runtime .. {example} --steps 20 --seed 0 --out imgs
python -m tinyprune.runtime bench .. --out bench.json      # latency and memory of this board, as JSON
```

That writes `imgs/00_{name}_seed0.png` ({size}x{size} RGB). {repeat}
`--scheduler {kinds}` (default: {default_scheduler}), `--guidance G` (default {guidance}),
`--backend ort-cpu|ort-cuda|trt`, `--npy` also writes the float images. The same seed gives the same image.

Where tinyprune is installed, the same loop is `tinyprune generate {bundle} {example} --steps 20 --seed 0 --out imgs`.

What the loop does: initial noise `numpy.random.default_rng(seed).standard_normal((B, {channels}, {latent}, {latent}))`,
{conditioning}, {steps_note}, then {decode}.
Files: `runtime/scheduler_config.json`, `runtime/shapes.json`{files}; code in `runtime/tinyprune/runtime/`
(tinyprune {version}).
"""

CONDITIONING_NOTES = {
    "text": ('--prompt "a red bicycle"', "Repeat `--prompt` for more images, `--num-images N` for N per prompt.",
             "the prompt tokenized with `tokenizers` on {tokenizers} and encoded by {encoders}{guided}"),
    "none": ("--num-images 1", "`--num-images N` for N images.", "no conditioning (sample and timestep only)"),
}


def runtime_shapes(pipe, conditioning: dict) -> dict:
    vae = pipe.vae
    return {
        "family": pipe.family.name,
        "latent_channels": int(pipe.latent_channels),
        "latent_size": int(pipe.latent_size),
        "vae_scale": int(pipe.vae_scale),
        "image_size": int(pipe.latent_size * pipe.vae_scale),
        "image_channels": int(vae.config.out_channels if vae is not None else pipe.unet.config.out_channels),
        "decoder": "vae_decoder" if vae is not None else None,
        "scaling_factor": float(vae.config.scaling_factor) if vae is not None else None,
        "conditioning": conditioning,
    }


def _readme(shapes: dict, sched: dict, default: str) -> str:
    spec = shapes["conditioning"]
    example, repeat, note = CONDITIONING_NOTES[spec["kind"]]
    text = spec["kind"] == "text"
    if text:
        encoders = spec["encoders"]
        guided = ("; the UNet runs on the batch [uncond, cond] with the empty prompt's encoding" +
                  (" set to zeros" if spec.get("null") == "zeros" else "") if spec.get("guided") else
                  "; guidance embedded in `timestep_cond`, one UNet call per step")
        note = note.format(tokenizers=", ".join(f"`runtime/{e['tokenizer']}`" for e in encoders),
                           encoders=", ".join(f"`{e['component']}/model.onnx` (`{e['context']}`)" for e in encoders),
                           guided=guided)
    name = {"text": "a-red-bicycle", "none": "sample"}[spec["kind"]]
    decode = (f"`vae_decoder/model.onnx` on `latents / {shapes['scaling_factor']}` and `image / 2 + 0.5`"
              if shapes["decoder"] else "`image / 2 + 0.5` (pixel space: the latents are the image)")
    files = {"none": ""}.get(
        spec["kind"], "".join(f", `runtime/{e['tokenizer']}`" for e in spec.get("encoders", ())))
    return README.format(
        bundle="BUNDLE", needs=", tokenizers" if text else "", pip=" tokenizers" if text else "", example=example,
        name=name, size=shapes["image_size"], repeat=repeat, kinds="|".join(KINDS), default_scheduler=default,
        guidance=spec.get("guidance", "-"), channels=shapes["latent_channels"], latent=shapes["latent_size"],
        conditioning=note, steps_note=f"{default} steps from `scheduler_config.json` ({sched.get('beta_schedule')}, "
        f"timestep_spacing {sched.get('timestep_spacing')})", decode=decode, files=files, version=__version__)


def write_runtime_dir(pipe, root: Path) -> Path:
    """Write root/runtime/ for the (pruned) pipeline `pipe` whose UNet and VAE decoder the bundle holds."""
    rt = Path(root) / RUNTIME_DIR
    rt.mkdir(parents=True, exist_ok=True)
    sched = dict(pipe.scheduler.config)
    sched["_class_name"] = type(pipe.scheduler).__name__
    sched = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sched.items() if not k.startswith("_") or
             k == "_class_name"}
    (rt / SCHEDULER_FILE).write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
    conditioning, files = pipe.family.runtime_conditioning()
    for name, content in files.items():
        (rt / name).write_text(content)
    shapes = runtime_shapes(pipe, conditioning)
    (rt / SHAPES_FILE).write_text(json.dumps(shapes, indent=2, sort_keys=True) + "\n")
    (rt / "README.md").write_text(_readme(shapes, sched, make_scheduler(sched).name))
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
