"""Stable-Diffusion-1.5-sized pipeline through tinyprune, with peak RSS and time per stage, beside optimum.

    .venv/bin/python benchmarks/sd15_scale.py [--work DIR] [--optimum-python VENV/bin/python]

What runs (each in its own subprocess, one after the other):
  make        a UNet2DConditionModel with SD 1.5's configuration and an AutoencoderKL with SD's VAE
              configuration and a CLIPTextModel with SD's text encoder configuration, random weights made
              here (no download), a CLIPTokenizer over bytes (the tests'), saved as a pipeline dir (save_pipeline)
  export      `tinyprune export --sparsity 0.43` (magnitude, unstructured) with benchmarks/sd15_profile.toml:
              load, dense reference images, prune in place, pruned images, save, ONNX export of UNet
              (external data) and VAE encoder/decoder, PyTorch references, onnxruntime drift, bundle
  2:4         the same UNet, magnitude 2:4 through tinyprune.prune.run with the data-free layer ranking
              (batches=[]: see the note printed at the end), save, ONNX export of the UNet
  verify      `tinyprune verify` of the export's bundle (checksums + every metadata claim, streamed)
  images      the image stages alone, after the fixes the first export run led to (see results/sd15_scale.md)
  optimum     the same dense UNet through optimum's ONNX exporter (optimum.exporters.onnx.export with
              its UNetOnnxConfig), in its own venv (optimum-onnx pins transformers<4.58)

How memory is measured, per stage: the kernel's peak RSS of the process (VmHWM from /proc/self/status),
reset at the start of each stage by writing 5 to /proc/self/clear_refs (Linux >= 4.0), and read at its end;
per subprocess: ru_maxrss from wait4, which after such resets only reflects the last stage's peak, so the
"whole process" row takes the max of it and every stage's peak. RSS counts resident file-backed pages too
(weights are mmapped from safetensors at load and become resident as they are touched).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = HERE / "sd15_profile.toml"
GOAL = 1.5  # peak RSS at most 1.5x the fp32 UNet weights

sys.path.insert(0, str(ROOT))  # also in the optimum venv, which has no tinyprune installed
from tinyprune.runtime.measure import peak_rss_mb, release_free_memory, reset_peak_rss  # noqa: E402  (stdlib only)

UNET_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json, values typed out here
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
TEXT_CONFIG = dict(  # its text_encoder/config.json
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
VAE_CONFIG = dict(  # its vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)


# ---------------------------------------------------------------- helpers that run inside the subprocesses
class _Stages:
    def __init__(self):
        self.seconds, self.peak_rss_mb = {}, {}

    def __call__(self, name):
        stages = self

        class _S:
            def __enter__(self):
                release_free_memory()  # freed heap back to the OS, as tinyprune.workflows.export's stages do
                reset_peak_rss()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                stages.seconds[name] = round(time.perf_counter() - self.t0, 2)
                stages.peak_rss_mb[name] = peak_rss_mb()
                print(f"  {name}: {stages.seconds[name]:.1f} s, peak RSS {stages.peak_rss_mb[name] / 1024:.2f} GiB",
                      file=sys.stderr, flush=True)

        return _S()


def cmd_make(pipe_dir: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import SD_INDEX, tokenizer
    from tinyprune.model.pipeline import Pipeline, save_pipeline

    st = _Stages()
    with st("build random SD-1.5 UNet + VAE + text encoder"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        tok = tokenizer(Path(pipe_dir).parent / "sd15-vocab")
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = Pipeline(unet, vae, sched, {"text_encoder": encoder, "tokenizer": tok}, dict(SD_INDEX)).eval()
    with st("save_pipeline"):
        save_pipeline(pipe, Path(pipe_dir))
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    return {"unet_params": n_unet, "vae_params": n_vae, "unet_fp32_bytes": 4 * n_unet, "vae_fp32_bytes": 4 * n_vae,
            "seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


def cmd_two_four(pipe_dir: str, out_dir: str) -> dict:
    from tinyprune import __version__
    from tinyprune.export.specs import component_spec, export_spec
    from tinyprune.config import PruneSpec, load_profile
    from tinyprune.export.writer import MAX_EXPORT_OPSET, export_component
    from tinyprune.model.pipeline import load_pipeline, save_pipeline
    from tinyprune.prune.run import prune

    st = _Stages()
    profile = load_profile(str(PROFILE))
    spec, _ = PruneSpec.resolve("magnitude", 0.43, "2:4", "global", False, profile)
    out = Path(out_dir)
    with st("load"):
        pipe = load_pipeline(pipe_dir)
    with st("prune 2:4 (data-free ranking)"):
        plan = prune(pipe, spec, batches=[]).to_dict()
    with st("save pruned pipeline"):
        save_pipeline(pipe, out / "pruned")
    xspec = export_spec(pipe, profile, MAX_EXPORT_OPSET)
    meta = {"version": __version__, "method": spec.method, "pattern": spec.pattern, "profile": profile.name,
            "source_sha256": "benchmark"}
    with st("export unet"):
        stamped = export_component(pipe, component_spec(pipe, "unet"), xspec, out / "unet" / "model.onnx", meta)
    tensors = json.loads(stamped["tinyprune.tensors"])
    return {"sparsity": plan["components"]["unet"]["sparsity"],
            "tensors_2to4": sum(t["pattern"] == "2:4" for t in tensors.values()),
            "onnx_sparsity": float(stamped["tinyprune.sparsity"]),
            "seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


def cmd_images(pipe_dir: str) -> dict:
    """The image stages alone: the dense-vs-pruned gate at the profile's opt latent (what export does now) and
    PyTorch images at the native 64x64 latent / 512 px with the fused attention (the runtime reference)."""
    from tinyprune.config import load_profile
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.judge.checks import image_latent_size, reference_images

    st = _Stages()
    profile = load_profile(str(PROFILE))
    with st("load"):
        pipe = load_pipeline(pipe_dir)
    with st(f"image gate, 1 label, 2 steps, latent {image_latent_size(profile)}"):
        reference_images(pipe, 1, 2, image_latent_size(profile))
    with st("PyTorch images, 1 label, 2 steps, native latent 64 (512 px), fused attention"):
        reference_images(pipe, 1, 2, None)
    return {"seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


def cmd_optimum(pipe_dir: str, out_dir: str) -> dict:
    """Runs in the optimum venv: optimum's own exporter on the bare UNet (see main() for why not main_export)."""
    import torch
    from diffusers import UNet2DConditionModel
    from optimum.exporters.onnx import export
    from optimum.exporters.onnx.model_configs import UNetOnnxConfig

    st = _Stages()
    with st("load unet"):
        unet = UNet2DConditionModel.from_pretrained(Path(pipe_dir) / "unet", use_safetensors=True).eval()
    # what optimum's main_export builds for a diffusers pipeline's unet (get_diffusion_models_for_export)
    config = UNetOnnxConfig(unet.config, task="semantic-segmentation", int_dtype="int64", float_dtype="fp32")
    out = Path(out_dir) / "unet" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    with st("export unet (optimum)"), torch.no_grad():
        export(model=unet, config=config, output=out, opset=17)
    from importlib.metadata import version

    files = {p.name: p.stat().st_size for p in out.parent.iterdir()}
    return {"optimum_onnx": version("optimum-onnx"), "optimum": version("optimum"), "torch": torch.__version__,
            "files": len(files), "bytes": sum(files.values()), "seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


# ---------------------------------------------------------------- the driver
def _run(name: str, argv: list[str], results: dict, env=None) -> dict | None:
    """Run one stage in a subprocess; its JSON result on the last stdout line, its ru_maxrss from wait4."""
    print(f"[{name}] {' '.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    entry = {"argv": argv, "exit_code": code, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
             "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    try:
        entry["result"] = json.loads(stdout[stdout.index("{"):]) if "{" in stdout else None
    except json.JSONDecodeError:
        entry["result"] = None
        entry["stdout_tail"] = stdout[-2000:]
    results[name] = entry
    print(f"[{name}] exit {code}, {wall:.0f} s wall, {entry['cpu_s']:.0f} s CPU, max RSS {entry['max_rss_mb'] / 1024:.2f} GiB", file=sys.stderr, flush=True)
    return entry


def _table(results: dict) -> str:
    weights = results["make"]["result"]["unet_fp32_bytes"] / 1024**2
    goal = GOAL * weights
    lines = [f"fp32 UNet weights {weights / 1024:.2f} GiB ({results['make']['result']['unet_params'] / 1e6:.1f} M params), "
             f"VAE {results['make']['result']['vae_fp32_bytes'] / 1024**3:.2f} GiB; goal: peak RSS <= {GOAL}x UNet "
             f"weights = {goal / 1024:.2f} GiB", "",
             "| run | stage | seconds | peak RSS GiB | x UNet weights | within goal |", "|---|---|---|---|---|---|"]
    for run, entry in results.items():
        if not isinstance(entry, dict) or "max_rss_mb" not in entry:
            continue
        res = entry.get("result") or {}
        for stage, secs in (res.get("seconds") or res.get("timings") or {}).items():
            peak = (res.get("peak_rss_mb") or {}).get(stage)
            if peak is None:
                continue
            lines.append(f"| {run} | {stage} | {secs:.1f} | {peak / 1024:.2f} | {peak / weights:.2f} | "
                         f"{'yes' if peak <= goal else 'NO'} |")
        # ru_maxrss alone is not the whole process's peak here: the kernel derives it from the peak counter that
        # the per-stage resets restart, so it reports the last stage's peak; take the max with the stages'.
        peak = max([entry["max_rss_mb"], *(res.get("peak_rss_mb") or {}).values()])
        lines.append(f"| {run} | **whole process**, exit {entry['exit_code']}, CPU {entry.get('cpu_s', 0):.0f} s "
                     f"| {entry['wall_s']:.1f} | {peak / 1024:.2f} | {peak / weights:.2f} | "
                     f"{'yes' if peak <= goal else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="sd15-work", help="work dir (needs ~25 GB of disk)")
    ap.add_argument("--optimum-python", default=None,
                    help="python of a venv with optimum-onnx + diffusers (none: optimum is skipped)")
    ap.add_argument("--only", default="make,export,two_four,verify,images,optimum", help="comma-separated runs")
    ap.add_argument("--results", default=str(HERE / "results" / "sd15_scale.json"))
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    py = sys.executable
    pipe = work / "sd15"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    if "make" in only:
        _run("make", [py, __file__, "_make", str(pipe)], results, env)
    if "export" in only:
        _run("export", [py, "-m", "cli", "export", "--model", str(pipe), "--sparsity", "0.43", "--target", str(PROFILE),
                        "--image-checks", "1", "--image-steps", "2", "--out", str(work / "bundle-magnitude"),
                        "--force", "--json"], results, env)
    if "export_nocheck" in only:  # the export again with every image gate off: the stages' memory without sampling
        _run("export_nocheck", [py, "-m", "cli", "export", "--model", str(pipe), "--sparsity", "0.43", "--target",
                                str(PROFILE), "--image-checks", "0", "--out", str(work / "bundle-magnitude-nocheck"),
                                "--force", "--json"], results, env)
    if "two_four" in only:
        _run("two_four", [py, __file__, "_two_four", str(pipe), str(work / "bundle-2to4")], results, env)
    if "verify" in only:
        _run("verify", [py, "-m", "cli", "verify", str(work / "bundle-magnitude"), "--json"], results, env)
    if "images" in only:
        _run("images", [py, __file__, "_images", str(pipe)], results, env)
    if "optimum" in only and args.optimum_python:
        _run("optimum", [args.optimum_python, __file__, "_optimum", str(pipe), str(work / "optimum")], results, env)
    results["machine"] = {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                          "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    # this machine's paths stay out of the results: the repo root as ".", the work dir as "WORK"
    text = json.dumps(results, indent=2).replace(str(work), "WORK").replace(str(ROOT), ".")
    if args.optimum_python:
        text = text.replace(args.optimum_python, "OPTIMUM_VENV/bin/python")
    results_path.write_text(text + "\n")
    if "make" in results:
        table = _table(results)
        print(table)
        results_path.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        fn = {"_make": cmd_make, "_two_four": cmd_two_four, "_images": cmd_images, "_optimum": cmd_optimum}[sys.argv[1]]
        print(json.dumps(fn(*sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
