"""Precision x method x model size, as a user runs it: `tinyprune export --precision P` per row, then the UNet files
of every row timed side by side on onnxruntime CPU in one interleaved run.

Rows (export flags beyond --out/--force/--json):
    demo:  dense fp32 (--sparsity 0), l1-grad 0.43 fp32 / int8, diff-pruning 0.43 fp32 / int8  (--target x86-cpu)
           l1-grad 0.43 fp16 (--target x86-ampere-gpu: its fp16 drift per component, on onnxruntime CPU here)
    mid:   a mid-size StableDiffusionPipeline built here (UNet2DConditionModel 79.7M params, 16x16 latents, 128 px,
           a 512-wide CLIP text encoder, a small KL VAE; random weights, saved with save_pretrained):
           magnitude 0.43 fp32 / int8 (--target x86-cpu --image-checks 2 --quality 0: random weights make no digits)
FD ratio and accuracy come from each export's report (int8 rows: the bundle runtime's samples against the dense
PyTorch pipeline's); UNet p50s from one interleaved run over all rows' files (batch 2, CFG), so speed-ups are ratios
measured side by side.

    python benchmarks/precision.py                         # everything, about 30 minutes on 2 cores
    python benchmarks/precision.py --rows mid-fp32,mid-int8 --out /tmp/p
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import command_line, relative_paths  # noqa: E402

CPU = ["--target", "x86-cpu"]
ROWS = {
    "demo-dense-fp32": ["--sparsity", "0", *CPU],
    "demo-l1grad-fp32": ["--method", "l1-grad", *CPU],
    "demo-l1grad-int8": ["--method", "l1-grad", "--precision", "int8", *CPU],
    "demo-diffpruning-fp32": ["--method", "diff-pruning", *CPU],
    "demo-diffpruning-int8": ["--method", "diff-pruning", "--precision", "int8", *CPU],
    "demo-l1grad-fp16": ["--method", "l1-grad", "--precision", "fp16", "--target", "x86-ampere-gpu"],
    "mid-fp32": ["--method", "magnitude", *CPU, "--image-checks", "2", "--quality", "0"],
    "mid-int8": ["--method", "magnitude", "--precision", "int8", *CPU, "--image-checks", "2", "--quality", "0"],
}
# int8 + structured against dense fp32: the two savings together
BASELINE = {"demo-l1grad-int8": "demo-l1grad-fp32", "demo-diffpruning-int8": "demo-dense-fp32",
            "mid-int8": "mid-fp32", "demo-l1grad-fp32": "demo-dense-fp32", "demo-diffpruning-fp32": "demo-dense-fp32",
            "mid-fp32": "mid-fp32"}
DEFAULT_ROWS = [r for r in ROWS if r != "demo-diffpruning-fp32"]  # its figures: benchmarks/results/methods.md


def mid_pipeline(out: Path) -> Path:
    """A mid-size text-to-image StableDiffusionPipeline (random weights), the demo's tokenizer, saved by diffusers."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tinyprune.model.pipeline import demo_dir

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(demo_dir() / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024,
                                        num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=16,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(block_out_channels=(160, 320, 480), layers_per_block=2, sample_size=16,
                                cross_attention_dim=512, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        sample_size=128)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def tinyprune(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "tinyprune.cli", *args], capture_output=True, text=True)
    return r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def export_row(name: str, work: Path, reuse: bool, log) -> dict:
    bundle = work / name
    flags = list(ROWS[name])
    if name.startswith("mid"):
        flags = ["--model", str(mid_pipeline(work / "mid-pipeline"))] + flags
    t0 = time.monotonic()
    if reuse and (bundle / "report" / "report.json").is_file():  # an earlier run's bundle: time it again only
        code, err = (1 if json.loads((bundle / "report" / "report.json").read_text())["failed"] else 0), ""
    else:
        code, err = tinyprune("export", *flags, "--out", str(bundle), "--force", "--json")
    wall = time.monotonic() - t0
    if code not in (0, 1) or not (bundle / "report" / "report.json").is_file():
        raise SystemExit(f"{name}: export exit {code}: {err}")
    report = json.loads((bundle / "report" / "report.json").read_text())
    q = report.get("quality")
    drift = {}
    for d in report["onnx_drift"]:
        comp = d["name"].split(".")[0]
        drift[comp] = max(drift.get(comp, 0.0), d["max_abs"])
    runtime = next((d for d in report["runtime_drift"] if not d["skipped"]), None)
    p = report["precision"]
    log(f"{name}: exit {code} in {wall:.0f} s" + (f", FD ratio {q['fd_ratio']:.3f}" if q else ""))
    return {"row": name, "flags": ROWS[name], "export_exit": code, "failed_gates": report["failed"],
            "export_wall_s": round(wall, 1), "precision": p["precision"], "converted": p["components"],
            "export_measured": p["unet_measured"], "onnx_drift_max_abs": drift,
            "runtime_psnr_db": runtime["psnr_db"] if runtime else None,
            "fd_ratio": q["fd_ratio"] if q else None, "accuracy": q["pruned"]["accuracy"] if q else None,
            "accuracy_dense": q["dense"]["accuracy"] if q else None, "bundle": bundle}


def time_unets(rows: list[dict], iters: int) -> dict[str, float]:
    """p50 ms of every row's UNet file, all interleaved in one run; feed: the bundle's opt shape (batch 2)."""
    from tinyprune.runtime.measure import component_feed, interleaved, stats_ms
    from tinyprune.runtime.runners import OrtRunner

    runners, jobs = [], {}
    for r in rows:
        if r["precision"] == "fp16":  # fp16 runs on GPUs; onnxruntime CPU casts it back to fp32
            continue
        manifest = json.loads((r["bundle"] / "manifest.json").read_text())
        feed = component_feed(manifest["components"], "unet")
        runner = OrtRunner(r["bundle"] / "unet" / "model.onnx", threads=2).__enter__()
        runners.append(runner)
        jobs[r["row"]] = (lambda run=runner, f=feed: run(f))
    times = interleaved(jobs, warmup=3, iters=iters)
    for runner in runners:
        runner.__exit__()
    return {k: stats_ms(v)["p50_ms"] for k, v in times.items()}


def table(rows: list[dict]) -> str:
    head = ("| row | precision | UNet p50 ms | speed-up vs | FD / dense | accuracy | UNet drift max abs | "
            "runtime PSNR | kept float | gates failed |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    out = []
    for r in rows:
        base = BASELINE.get(r["row"])
        vs = f"{r['speedup']:.2f}x {base}" if r.get("speedup") and base != r["row"] else "-"
        kept = sum(len(c["kept_float"]) for c in r["converted"].values())
        out.append(f"| {r['row']} | {r['precision']} | {f(r.get('unet_p50_ms'), '.1f')} | {vs} | "
                   f"{f(r['fd_ratio'], '.3f')} | {f(r['accuracy'], '.3f')} | "
                   f"{f(r['onnx_drift_max_abs'].get('unet'), '.3g')} | {f(r['runtime_psnr_db'], '.1f')} | {kept} | "
                   f"{', '.join(r['failed_gates']) or '-'} |\n")
    return head + "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--iters", type=int, default=30, help="timed UNet calls per row")
    ap.add_argument("--work", type=Path, default=None, help="keep the pipelines and bundles here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="with --work: keep a row's bundle from an earlier run "
                    "(its export wall time then reads 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision")
    args = ap.parse_args(argv)
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [export_row(n, work, args.reuse, log) for n in names]
        p50 = time_unets(rows, args.iters)
    for r in rows:
        r["unet_p50_ms"] = p50.get(r["row"])
        base = BASELINE.get(r["row"])
        if base in p50 and r["row"] in p50:
            r["speedup"] = round(p50[base] / p50[r["row"]], 3)
        r["bundle"] = r["bundle"].name
    rel = relative_paths(work, args.out.parent.resolve())
    cmd = command_line("benchmarks/precision.py", argv, rel)
    from tinyprune.runtime.measure import cpu_name

    meta = {"command": cmd, "machine": f"{cpu_name()}, {platform.machine()}", "minutes": round((time.monotonic() - t0) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(rel(json.dumps({**meta, "rows": rows}, indent=1)) + "\n")
    md = (f"# Precision x method x model size\n\n`{cmd}`\n\nMachine: {meta['machine']}; {meta['minutes']} min. UNet "
          "p50: onnxruntime CPU, 2 threads, batch 2, every row's file in one interleaved run. FD / accuracy: the "
          "export's quality gates (int8 rows: the bundle runtime's samples). Drift: ONNX vs PyTorch fp32 on the "
          "random drift feed.\n\n" + table(rows))
    args.out.with_suffix(".md").write_text(rel(md))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
