"""optimum's ORT pipelines on tinyprune bundles: the bundle dir as it stands, against diffusers on BUNDLE/pruned.

For each of the sd, sdxl and lcm tiny random-weight pipelines of tests/pipelines.py: build and save it, export it
with the real CLI in its own subprocess (default method, magnitude 0.43)

    .venv/bin/tinyprune export --model DIR --out BUNDLE --target x86-cpu --force --json

then render one image two or three ways from the same prompt ("a red bicycle"), the same initial latents (one
.npy, passed as `latents=`), steps and guidance, a torch CPU generator of the same seed (LCMScheduler adds fresh
noise between steps), output_type "np":

- torch: diffusers' own pipeline class (DiffusionPipeline.from_pretrained, the class of BUNDLE/pruned's index) on
  BUNDLE/pruned, in this venv (transformers 5.x);
- optimum: optimum-onnx's ORTStableDiffusionPipeline / ORTStableDiffusionXLPipeline /
  ORTLatentConsistencyModelPipeline.from_pretrained(BUNDLE) in the --optimum-python venv (transformers 4.x, which
  need not read 5.x's weights: optimum reads only the ONNX files, config.json per component, the tokenizers and
  the scheduler). The same child also asks optimum's class-name lookup (ORTPipelineForText2Image) which class the
  bundle's model_index.json names;
- diffusers-onnx (sd only): diffusers' OnnxStableDiffusionPipeline on BUNDLE in this venv (it assumes a /8 VAE:
  it is asked for 8x the latent size so it takes the same latents).

PSNR (dB, data range 1) of every client's image against torch's. Nothing is downloaded (HF_HUB_OFFLINE=1).

    .venv/bin/python benchmarks/optimum_client.py [--families sd,sdxl,lcm] [--optimum-python /work/optvenv/bin/python]
        [--steps 4] [--work DIR] [--out-dir benchmarks/results]   # OUT_DIR/optimum_client.md and .json

Run from the repo root. Not part of the pytest suite: it needs a venv with optimum-onnx, onnxruntime and diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from provenance import command_line, relative_paths

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = ROOT / ".venv" / "bin" / "tinyprune"
PROMPT = "a red bicycle"
FAMILIES = ("sd", "sdxl", "lcm")
GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "lcm": 8.5}  # each pipeline class's default guidance_scale
ORT_CLASS = {"sd": "ORTStableDiffusionPipeline", "sdxl": "ORTStableDiffusionXLPipeline",
             "lcm": "ORTLatentConsistencyModelPipeline"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def render_kwargs(family: str, steps: int, size: int) -> dict:
    """The call both sides make, latents aside: pixel size = latent size x the VAE's scale."""
    return {"num_inference_steps": steps, "guidance_scale": GUIDANCE[family], "height": size, "width": size,
            "output_type": "np"}


# ---- the optimum side: runs in the --optimum-python venv, imports nothing of tinyprune or the tests
def ort_client(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from optimum.onnxruntime import modeling_diffusion as md
    from optimum.onnxruntime import ORTPipelineForText2Image

    job = json.loads(args.ort_client)
    cls = getattr(md, job["class"])
    t0 = time.perf_counter()
    pipe = cls.from_pretrained(job["bundle"], provider="CPUExecutionProvider", local_files_only=True)
    load_s = time.perf_counter() - t0
    try:  # what the class-name lookup makes of the bundle's model_index.json (without building a second pipeline)
        index = json.loads((Path(job["bundle"]) / "model_index.json").read_text())
        resolved = md._get_task_ort_class(ORTPipelineForText2Image.ort_pipelines_mapping, index["_class_name"]).__name__
    except ValueError as e:
        resolved = f"error: {e}"
    latents = torch.from_numpy(np.load(job["latents"]))
    generator = torch.Generator("cpu").manual_seed(job["seed"])  # LCMScheduler draws fresh noise between steps
    t0 = time.perf_counter()
    image = pipe(job["prompt"], latents=latents, generator=generator, **job["kwargs"]).images
    np.save(job["image"], np.asarray(image, dtype=np.float32))
    print(json.dumps({"class": type(pipe).__name__, "text2image_lookup": resolved, "load_s": round(load_s, 2),
                      "render_s": round(time.perf_counter() - t0, 2), "shape": list(np.shape(image)),
                      "versions": {p: _version(p) for p in ("optimum-onnx", "optimum", "diffusers", "transformers",
                                                            "onnxruntime", "torch")}}))
    return 0


# ---- the main side
def export_bundle(model: Path, bundle: Path, log: Path) -> dict:
    argv = [str(CLI), "export", "--model", str(model), "--out", str(bundle), "--target", "x86-cpu", "--force",
            "--json"]
    print(f"[export] {shlex.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True,
                              env={**os.environ, **OFFLINE})
    # exit 1 = a quality gate failed (expected on random weights): the bundle is written all the same
    if proc.returncode not in (0, 1) or not (bundle / "model_index.json").is_file():
        raise SystemExit(f"export of {model} failed (exit {proc.returncode}): {log.read_text()[-2000:]}")
    return {"argv": argv, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def torch_image(bundle: Path, latents, kwargs: dict, seed: int):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(bundle / "pruned", local_files_only=True)
    generator = torch.Generator("cpu").manual_seed(seed)  # the same CPU generator as the optimum side's
    images = pipe(PROMPT, latents=torch.from_numpy(latents), generator=generator, **kwargs).images
    return type(pipe).__name__, np.asarray(images)


def diffusers_onnx_image(bundle: Path, latents, kwargs: dict):
    import numpy as np
    from diffusers import OnnxStableDiffusionPipeline

    pipe = OnnxStableDiffusionPipeline.from_pretrained(bundle, provider="CPUExecutionProvider", local_files_only=True)
    size = latents.shape[-1] * 8  # its /8 assumption: 8x the latent size asks for these latents
    return np.asarray(pipe(PROMPT, latents=latents, **{**kwargs, "height": size, "width": size}).images)


def run_family(family: str, args: argparse.Namespace, work: Path) -> dict:
    import numpy as np
    from pipelines import save

    from tinyprune.judge.drift import psnr

    t0 = time.perf_counter()
    model = save(family, work / "pipelines" / family)
    build_s = round(time.perf_counter() - t0, 1)
    bundle = work / "bundles" / family
    bundle.parent.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    export = export_bundle(model, bundle, work / "logs" / f"{family}.export.stderr")

    unet = json.loads((bundle / "unet" / "config.json").read_text())
    vae = json.loads((bundle / "vae_decoder" / "config.json").read_text())
    latent, vae_scale = int(unet["sample_size"]), 2 ** (len(vae["block_out_channels"]) - 1)
    latents = np.random.default_rng(args.seed).standard_normal((1, int(unet["in_channels"]), latent, latent))
    latents_path = work / f"{family}.latents.npy"
    np.save(latents_path, latents.astype(np.float32))
    latents = np.load(latents_path)
    kwargs = render_kwargs(family, args.steps, latent * vae_scale)

    torch_class, want = torch_image(bundle, latents, kwargs, args.seed)
    images = {}
    job = {"class": ORT_CLASS[family], "bundle": str(bundle), "latents": str(latents_path), "prompt": PROMPT,
           "kwargs": kwargs, "seed": args.seed, "image": str(work / f"{family}.optimum.npy")}
    argv = [args.optimum_python, str(Path(__file__).resolve()), "--ort-client", json.dumps(job)]
    print(f"[{family} optimum] {ORT_CLASS[family]}.from_pretrained({bundle})", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **OFFLINE})
    (work / "logs" / f"{family}.optimum.stderr").write_text(proc.stderr)
    optimum = {"exit_code": proc.returncode}
    if proc.returncode == 0:
        optimum.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        images["optimum"] = np.load(job["image"])
    else:
        optimum["stderr_tail"] = proc.stderr[-3000:]
    if family == "sd":
        images["diffusers-onnx"] = diffusers_onnx_image(bundle, latents, kwargs)  # PNDM: no noise drawn
    index = json.loads((bundle / "model_index.json").read_text())
    return {"family": family, "build_s": build_s, "export": export, "model_index_class": index["_class_name"],
            "torch_class": torch_class, "optimum": optimum, "kwargs": kwargs, "latents_shape": list(latents.shape),
            "shape": list(want.shape),
            "psnr_db": {k: (None if v.shape != want.shape else round(psnr(v, want), 2)) for k, v in images.items()}}


def table(runs: list[dict]) -> str:
    def db(r: dict, client: str) -> str:
        if client not in r["psnr_db"]:
            return "-" if client != "optimum" else f"failed (exit {r['optimum']['exit_code']})"
        v = r["psnr_db"][client]
        return "shape mismatch" if v is None else ("inf (identical)" if v == float("inf") else f"{v:.1f}")

    lines = ["| family | model_index `_class_name` | torch (BUNDLE/pruned) | optimum class | ORTPipelineForText2Image "
             "resolves | image | steps, guidance | PSNR optimum vs torch (dB) | PSNR diffusers-onnx vs torch (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        o, k = r["optimum"], r["kwargs"]
        lines.append(f"| {r['family']} | {r['model_index_class']} | {r['torch_class']} | {o.get('class', '-')} "
                     f"| {o.get('text2image_lookup', '-')} | {'x'.join(map(str, r['shape'][1:3]))} "
                     f"| {k['num_inference_steps']}, {k['guidance_scale']} | {db(r, 'optimum')} "
                     f"| {db(r, 'diffusers-onnx')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    ap.add_argument("--optimum-python", default="/work/optvenv/bin/python",
                    help="python of a venv with optimum-onnx, onnxruntime and diffusers")
    ap.add_argument("--steps", type=int, default=4, help="inference steps, both sides")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the shared initial latents and of both sides' torch CPU generator")
    ap.add_argument("--work", default=None, help="pipelines, bundles, images and logs (default: a temp dir, removed)")
    ap.add_argument("--out-dir", default=str(HERE / "results"), help="where optimum_client.md and .json go")
    ap.add_argument("--ort-client", default=None, help=argparse.SUPPRESS)  # the child's job (JSON)
    args = ap.parse_args(argv)
    if args.ort_client:
        return ort_client(args)
    families = args.families.split(",")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    if not Path(args.optimum_python).is_file():
        ap.error(f"--optimum-python {args.optimum_python} does not exist (a venv with optimum-onnx and diffusers)")
    os.environ.update(OFFLINE)
    sys.path.insert(0, str(ROOT / "tests"))
    out_dir = Path(args.out_dir).resolve()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="optimum-client-")
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import torch

    machine = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "diffusers": _version("diffusers"),
               "transformers": _version("transformers"), "tinyprune": _version("tinyprune")}
    runs = [run_family(f, args, work) for f in families]

    # the results name no path of this machine
    rel = relative_paths(work, out_dir)
    command = command_line("benchmarks/optimum_client.py", argv, rel)
    ort = next((r["optimum"]["versions"] for r in runs if "versions" in r["optimum"]), {})
    header = (f"# optimum's ORT pipelines on tinyprune bundles\n\nCommand: `{command}` (from the repo root)\n\n"
              f"Machine: {machine['nproc']} CPUs (nproc), {machine['platform']}, Python {machine['python']}.\n"
              f"torch side (this venv): torch {machine['torch']}, diffusers {machine['diffusers']}, transformers "
              f"{machine['transformers']}, onnxruntime {machine['onnxruntime']}, tinyprune {machine['tinyprune']}.\n"
              f"optimum side ({rel(args.optimum_python)}): " + ", ".join(f"{k} {v}" for k, v in ort.items()) + ".\n\n"
              f"Tiny random-weight pipelines of tests/pipelines.py, exported with `tinyprune export --target x86-cpu` "
              f"(magnitude 0.43); prompt {PROMPT!r}, the same initial latents and torch CPU generator (seed "
              f"{args.seed}) on every side, output_type np. PSNR against diffusers' own pipeline on BUNDLE/pruned "
              f"(data range 1).\n")
    md = rel(header + "\n" + table(runs) + "\n")
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "optimum_client.md").write_text(md)
    data = {"command": command, "machine": machine, "optimum_venv": ort, "prompt": PROMPT, "runs": runs}
    (out_dir / "optimum_client.json").write_text(rel(json.dumps(data, indent=2, default=str)) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
