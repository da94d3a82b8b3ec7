"""Stable-Diffusion-1.5- and SDXL-sized pipelines through tinyprune's default commands, with peak RSS and time per
stage, beside optimum's exporter on the same pipeline.

    .venv/bin/python benchmarks/sd15_scale.py [--work DIR] [--optimum-python VENV/bin/python] [--only a,b,...]

What runs (each in its own subprocess, one after the other):
  make         a StableDiffusionPipeline with SD 1.5's configurations (UNet2DConditionModel, AutoencoderKL,
               CLIPTextModel ViT-L), random weights made here (no download), a CLIPTokenizer over bytes (the
               tests'), no safety checker, saved with diffusers' save_pretrained
  default      `tinyprune export --model DIR` with nothing else: magnitude 0.43, target jetson, every default gate
               (ONNX drift, dense-vs-pruned images, runtime-vs-PyTorch images; a UNet this large runs them at a
               smaller latent, export.specs.work_latent)
  optimum      `optimum-cli export onnx --model DIR --task text-to-image` in its own venv (optimum-onnx pins
               transformers < 4.58): text encoder, UNet, VAE encoder and decoder, each validated against PyTorch
               (its default). The venv gets a twin of DIR first (_optimum_dir): transformers 4.x reads neither
               transformers 5's CLIP keys nor its tokenizer.json-only tokenizer dir
  two_four     `tinyprune export --model DIR --pattern 2:4`: layers ranked by measured sensitivity on
               calibration latents made at the work latent
  structured   `tinyprune export --model DIR --method diff-pruning --sparsity 0.3 --calibration-samples 2
               --recovery-minutes 5`: Diff-Pruning's Taylor scores (the summed gradient held a sixteenth at a time),
               channel surgery, and the lean distillation a UNet this large gets (prune/recovery.py), default gates
  ld_pruner    the same with `--method ld-pruner`: LD-Pruner's output-statistics scores (forward passes only)
  verify       `tinyprune verify` of the default bundle (checksums + every metadata claim, streamed)
  make_sdxl    StableDiffusionXLPipeline parts with SDXL base 1.0's configurations (UNet 2.57B, CLIP ViT-L and
               OpenCLIP bigG text encoders, SDXL's VAE), random weights, save_pretrained
  sdxl         `tinyprune export --model SDXL_DIR --target jetson-agx-orin`, default gates
  sdxl_repeat  the same command again, kept beside the first: its export-unet stage's peak moves by GiBs between runs

How memory is measured, per stage: the kernel's peak RSS of the process (VmHWM from /proc/self/status),
reset at the start of each stage by writing 5 to /proc/self/clear_refs (Linux >= 4.0), and read at its end (the
export's report/timings.json, its --json output); per subprocess: ru_maxrss from wait4, which after such resets
only reflects the last stage's peak, so the "whole process" row takes the max of it and every stage's peak. RSS
counts resident file-backed pages too (weights are mmapped from safetensors at load and become resident as they
are touched). optimum's process resets nothing: its ru_maxrss is its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL = 1.5  # peak RSS at most 1.5x the fp32 UNet weights

def _measure():
    """tinyprune's runtime/measure.py (stdlib and numpy only) by path: the optimum venv has no tinyprune."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tinyprune_measure", ROOT / "exporter" / "runtime" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peak_rss_mb, release_free_memory, reset_peak_rss = (getattr(_measure(), n) for n in
                                                    ("peak_rss_mb", "release_free_memory", "reset_peak_rss"))

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
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import tokenizer

    st = _Stages()
    with st("build random SD-1.5 UNet + VAE + text encoder"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        tok = tokenizer(Path(pipe_dir).parent / "sd15-vocab")
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with st("save_pretrained"):
        pipe.save_pretrained(pipe_dir, safe_serialization=True)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    return {"unet_params": n_unet, "vae_params": n_vae, "unet_fp32_bytes": 4 * n_unet, "vae_fp32_bytes": 4 * n_vae,
            "seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, values typed out here
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
)
SDXL_TEXT_2 = dict(  # its text_encoder_2/config.json (OpenCLIP bigG), with projection
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, max_position_embeddings=77,
    vocab_size=49408, hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def cmd_make_sdxl(pipe_dir: str) -> dict:
    import diffusers as d
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import tokenizer

    st = _Stages()
    with st("build random SDXL UNet + VAE + two text encoders"):
        torch.manual_seed(0)
        tok = tokenizer(Path(pipe_dir).parent / "sdxl-vocab")
        pipe = d.StableDiffusionXLPipeline(
            unet=d.UNet2DConditionModel(**SDXL_UNET), vae=d.AutoencoderKL(**dict(VAE_CONFIG, scaling_factor=0.13025,
                                                                              sample_size=1024, force_upcast=True)),
            scheduler=d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading"),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)), tokenizer=tok, tokenizer_2=tok)
    with st("save_pretrained"):
        pipe.save_pretrained(pipe_dir, safe_serialization=True)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    return {"unet_params": n_unet, "unet_fp32_bytes": 4 * n_unet, "seconds": st.seconds, "peak_rss_mb": st.peak_rss_mb}


def cmd_optimum_dir(pipe_dir: str, out_dir: str) -> dict:
    """Runs in the optimum venv: the pipeline dir as transformers 4.x loads it, for optimum-cli. The UNet, VAE and
    scheduler are linked; the text encoder (transformers 5 saves CLIP's keys without the "text_model." prefix) and
    the tokenizer (transformers 5 writes tokenizer.json only, 4.x's CLIPTokenizer reads vocab.json + merges.txt)
    are written again by this venv's transformers, weights and vocabulary unchanged."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    src, out = Path(pipe_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "scheduler", "model_index.json"):
        if not (out / name).exists():
            (out / name).symlink_to(src / name)
    encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    state = load_file(str(src / "text_encoder" / "model.safetensors"))
    missing, unexpected = encoder.load_state_dict({f"text_model.{k}": v for k, v in state.items()}, strict=False)
    encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    vocab = src.parent / "sd15-vocab"
    CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77).save_pretrained(
        out / "tokenizer")
    return {"missing_keys": len(missing), "unexpected_keys": len(unexpected)}


# ---------------------------------------------------------------- the driver
def _commit() -> str | None:
    """The checkout's commit, "+" when its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")) or None


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
             "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "commit": _commit()}
    try:
        entry["result"] = json.loads(stdout[stdout.index("{"):]) if "{" in stdout else None
    except json.JSONDecodeError:
        entry["result"] = None
        entry["stdout_tail"] = stdout[-2000:]
    results[name] = entry
    print(f"[{name}] exit {code}, {wall:.0f} s wall, {entry['cpu_s']:.0f} s CPU, max RSS {entry['max_rss_mb'] / 1024:.2f} GiB", file=sys.stderr, flush=True)
    return entry


SD15_RUNS = ("make", "default", "optimum", "two_four", "structured", "ld_pruner", "verify")
SDXL_RUNS = ("make_sdxl", "sdxl", "sdxl_repeat")


def _table(results: dict, runs: tuple[str, ...]) -> str:
    """One row per stage and one per process of `runs`, against the fp32 UNet weights of runs[0] (its make)."""
    made = results[runs[0]]["result"]
    weights = made["unet_fp32_bytes"] / 1024**2
    goal = GOAL * weights
    lines = [f"fp32 UNet weights {weights / 1024:.2f} GiB ({made['unet_params'] / 1e6:.1f} M params); goal: peak RSS "
             f"<= {GOAL}x UNet weights = {goal / 1024:.2f} GiB ({goal * 1024**2 / 1e9:.2f} GB)", "",
             "| run | stage | seconds | peak RSS GiB | x UNet weights | within goal |", "|---|---|---|---|---|---|"]
    for run in runs:
        entry = results.get(run)
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
        at = f", at {entry['commit']}" if entry.get("commit") else ""
        lines.append(f"| {run} | **whole process**{at}, exit {entry['exit_code']}, CPU {entry.get('cpu_s', 0):.0f} s "
                     f"| {entry['wall_s']:.1f} | {peak / 1024:.2f} | {peak / weights:.2f} | "
                     f"{'yes' if peak <= goal else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="sd15-work", help="work dir (needs ~50 GB of disk with SDXL)")
    ap.add_argument("--optimum-python", default=None,
                    help="python of a venv with optimum-onnx + diffusers (none: optimum is skipped)")
    ap.add_argument("--only", default=",".join(SD15_RUNS + SDXL_RUNS), help="comma-separated runs")
    ap.add_argument("--results", default=str(HERE / "results" / "sd15_scale.json"))
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    py = sys.executable
    pipe, sdxl = work / "sd15", work / "sdxl"
    cli = [py, "-m", "tinyprune.cli", "export"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    if "make" in only:
        _run("make", [py, __file__, "_make", str(pipe)], results, env)
    if "default" in only:
        _run("default", cli + ["--model", str(pipe), "--out", str(work / "bundle-default"), "--force", "--json"],
             results, env)
    if "optimum" in only and args.optimum_python:
        twin = work / "sd15-optimum"
        _run("optimum_dir", [args.optimum_python, __file__, "_optimum_dir", str(pipe), str(twin)], results, env)
        cli_optimum = str(Path(args.optimum_python).parent / "optimum-cli")
        _run("optimum", [cli_optimum, "export", "onnx", "--model", str(twin), "--task", "text-to-image",
                         str(work / "optimum")], results, env)
    if "two_four" in only:
        _run("two_four", cli + ["--model", str(pipe), "--pattern", "2:4", "--out", str(work / "bundle-2to4"),
                                "--force", "--json"], results, env)
    for run, method in (("structured", "diff-pruning"), ("ld_pruner", "ld-pruner")):
        if run in only:
            _run(run, cli + ["--model", str(pipe), "--method", method, "--sparsity", "0.3",
                             "--calibration-samples", "2", "--recovery-minutes", "5",
                             "--out", str(work / f"bundle-{run}"), "--force", "--json"], results, env)
    if "verify" in only:
        _run("verify", [py, "-m", "tinyprune.cli", "verify", str(work / "bundle-default"), "--json"], results, env)
    if "make_sdxl" in only:
        _run("make_sdxl", [py, __file__, "_make_sdxl", str(sdxl)], results, env)
    for run in ("sdxl", "sdxl_repeat"):
        if run in only:
            # --force keeps the old bundle until the new one is published: two SDXL bundles (26 GB each) at once
            shutil.rmtree(work / "bundle-sdxl", ignore_errors=True)
            _run(run, cli + ["--model", str(sdxl), "--target", "jetson-agx-orin", "--out", str(work / "bundle-sdxl"),
                             "--force", "--json"], results, env)
    results["machine"] = {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                          "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    # this machine's paths stay out of the results: the repo root as ".", the work dir as "WORK"
    text = json.dumps(results, indent=2).replace(str(work), "WORK").replace(str(ROOT), ".")
    if args.optimum_python:
        text = text.replace(str(Path(args.optimum_python).parent.parent), "OPTIMUM_VENV")
    results_path.write_text(text + "\n")
    tables = [_table(results, runs) for runs in (SD15_RUNS, SDXL_RUNS) if runs[0] in results]
    print("\n\n".join(tables))
    machine = results["machine"]
    header = (f"# SD-1.5- and SDXL-sized pipelines: tinyprune's default commands beside optimum-cli\n\n"
              f"Command: `.venv/bin/python benchmarks/sd15_scale.py --work WORK --optimum-python "
              f"OPTIMUM_VENV/bin/python` (runs made with `--only`, merged in sd15_scale.json, which holds every "
              f"command line). Machine: {machine['cpus']} cores, {machine['mem_total_gb']} GB, no GPU; one run at "
              f"a time on an otherwise idle machine. How memory is measured: see the script's docstring.\n\n")
    results_path.with_suffix(".md").write_text(header + "\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        fn = {"_make": cmd_make, "_make_sdxl": cmd_make_sdxl, "_optimum_dir": cmd_optimum_dir}[sys.argv[1]]
        print(json.dumps(fn(*sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
