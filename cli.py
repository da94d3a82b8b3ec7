"""tinyprune command line: parse, call one exporter function, print, map errors to exit codes.

Heavy modules (torch, diffusers, onnx, tensorrt) are imported inside the commands so that
`tinyprune --help` stays fast and works without them.
"""

from __future__ import annotations

import errno
import json
import math
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from exporter.errors import TinypruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune diffusers pipelines and export them as ONNX / TensorRT bundles for edge devices.")
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)
state = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="diffusers pipeline dir (default: the shipped demo pipeline)")
TargetOpt = typer.Option("jetson", "--target", "-t", help="device profile name or alias, or a .toml path")
SparsityOpt = typer.Option("0.43", "--sparsity", "-s", help="fraction of prunable weights set to zero, in [0, 1)")
MethodOpt = typer.Option("magnitude", "--method", help="importance method: magnitude | l1-grad (alpha|w| + beta|dL/dw|, "
                         "iterative with L1 recovery) | diff-pruning | ld-pruner | ecodiff (structured: channels and "
                         "heads removed, pattern channel) | auto (2:4 where the target has sparse tensor cores, else "
                         "structured)")
PatternOpt = typer.Option("unstructured", "--pattern", help="unstructured | 2:4 | auto (2:4 where the target has sparse tensor cores) | channel (set by the structured methods)")
ScopeOpt = typer.Option("global", "--scope", help="global (one threshold over all layers) | layer (same sparsity per layer)")
QualityOpt = typer.Option(None, "--quality", help="digit-yardstick samples per class for the FD/accuracy gates (default 10; 0 skips)")
MaxFdOpt = typer.Option(None, "--max-fd-ratio", help="gate: pruned FD / dense FD at most this (default from the profile)")
MinAccOpt = typer.Option(None, "--min-accuracy", help="gate: class accuracy of pruned samples at least this (default from the profile)")
JsonOpt = typer.Option(False, "--json", help="print the machine-readable result on stdout")
ImageChecksOpt = typer.Option(None, "--image-checks", min=0,
                              help="class labels sampled for the dense-vs-pruned image gate (default: all; 0 skips "
                                   "the gate, e.g. for Stable-Diffusion-sized models on a CPU)")
ImageStepsOpt = typer.Option(None, "--image-steps", min=1, help="sampler steps of the image gate (default 20)")
AlphaOpt = typer.Option(None, "--alpha", help="l1-grad: weight of the |w| term (default 1.0; terms normalised to mean 1)")
BetaOpt = typer.Option(None, "--beta", help="l1-grad: weight of the |dL/dw| term (default 1.0; 0 = magnitude ranking)")
L1Opt = typer.Option(None, "--l1", help="recovery: lambda of the lambda*sum|w| penalty (default 1e-5)")
RecoveryOpt = typer.Option(None, "--recovery-steps", help="Adam steps on calibration batches after pruning, masks "
                           "held (default 200 for l1-grad, 300 for structured methods, 0 for magnitude)")
IterationsOpt = typer.Option(None, "--iterations", help="l1-grad: prune steps towards the target, with regrowth "
                             "between them (default 4)")
RecoveryTargetOpt = typer.Option(None, "--recovery-target", help="recovery's target: distill (the dense UNet's "
                                 "output; default) | noise (the true noise: no second UNet copy in memory)")
CalibrationOpt = typer.Option(None, "--calibration", help="folder of images for calibration batches (default: "
                              "data-free, the dense model's own samples)")


TargetMacsOpt = typer.Option(None, "--target-macs", help="structured: fraction of the dense UNet's MACs to keep, in "
                             "(0, 1]; replaces --sparsity as the target")
LatencyAwareOpt = typer.Option(False, "--latency-aware", help="structured: weigh each group by its measured "
                               "onnxruntime CPU time (or MACs, --cost-model macs) instead of its parameters")
CostModelOpt = typer.Option(None, "--cost-model", help="structured, --latency-aware: ort (measured) | macs")
RecoveryMinutesOpt = typer.Option(None, "--recovery-minutes", help="structured: wall-time cap of the recovery "
                                  "distillation (--recovery-steps steps, default 300 for structured methods)")


def _structured(target_macs, latency_aware, cost_model, recovery_minutes) -> dict:
    return {"target_macs": target_macs, "latency_aware": latency_aware, "cost_model": cost_model,
            "recovery_minutes": recovery_minutes}


def _tuning(alpha, beta, l1, recovery_steps, iterations, calibration, recovery_target) -> dict:
    return {"alpha": alpha, "beta": beta, "l1": l1, "recovery_steps": recovery_steps, "iterations": iterations,
            "recovery_target": recovery_target, "calibration": str(calibration) if calibration else None}


def log(msg: str) -> None:
    err.print(f"[dim]tinyprune:[/dim] {msg}")


def run(fn, *args, as_json: bool = False, show=None, **kwargs):
    """Call one exporter function; one line on stderr and the right exit code for every failure."""
    try:
        result = fn(*args, **kwargs)
    except TinypruneError as e:
        if state["debug"]:
            raise
        if as_json and getattr(e, "result", None) is not None:
            print(json.dumps(e.result, indent=2, default=str))
        elif getattr(e, "result", None) is not None and show:
            show(e.result)
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was published", markup=False)
        raise typer.Exit(130)
    except OSError as e:
        if state["debug"]:
            raise
        if e.errno == errno.ENOSPC:  # exit 1: the run failed on this machine, not the input (README: exit codes)
            err.print(f"error: disk full while writing {e.filename or 'the output'}: free some space and run again; "
                      "nothing was published", markup=False)
            raise typer.Exit(1)
        err.print(f"error: {e.strerror or e} ({e.filename or 'no file'})", markup=False)
        raise typer.Exit(2 if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)) else 1)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif show:
        show(result)
    return result


def _num(x) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)


def show_export(r: dict) -> None:
    t = Table(title=f"bundle {r['bundle']} ({r['profile']}, {r['method']}, {r['pattern']})")
    for col in ("check", "value", "gate", "ok"):
        t.add_column(col)
    for comp, s in r["sparsity"].items():
        t.add_row(f"sparsity {comp}", f"{s:.4f}", f"requested {r['requested_sparsity']}", "")
    for d in r["onnx_drift"]:
        t.add_row(d["name"], f"max abs {d['max_abs']:.3g}", f"<= {d['tolerance']:.3g}", "yes" if d["ok"] else "NO")
    img = r["image_drift"]
    if img.get("skipped"):
        t.add_row(img["name"], "skipped (--image-checks 0)", f">= {img['min_psnr_db']} dB", "-")
    else:
        t.add_row(img["name"], f"PSNR {_num(img['psnr_db'])} dB", f">= {img['min_psnr_db']} dB",
                  "yes" if img["ok"] else "NO")
    for d in r.get("runtime_drift", []):
        if d.get("skipped"):
            t.add_row(d["name"], "skipped (--image-checks 0)", f">= {d['min_psnr_db']} dB", "-")
        else:
            t.add_row(d["name"], f"PSNR {_num(d['psnr_db'])} dB, max abs {d['max_abs']:.2g}",
                      f">= {d['min_psnr_db']} dB", "yes" if d["ok"] else "NO")
    q = r.get("quality")
    if q:
        t.add_row(f"FD ratio pruned/dense ({q['n_samples']} samples)",
                  f"{q['fd_ratio']:.3f} (FD {q['pruned']['fd']:.3g} vs {q['dense']['fd']:.3g})",
                  f"<= {q['max_fd_ratio']}", "yes" if q["fd_ratio"] <= q["max_fd_ratio"] else "NO")
        t.add_row("class accuracy pruned (dense)", f"{q['pruned']['accuracy']:.3f} ({q['dense']['accuracy']:.3f})",
                  f">= {q['min_accuracy']}", "yes" if q["pruned"]["accuracy"] >= q["min_accuracy"] else "NO")
        t.add_row("PSNR / SSIM pruned vs dense", f"{_num(q['psnr_db'])} dB / {q['ssim']:.3f}", "", "")
    out.print(t)
    out.print(f"speed-up source: {r['speedup_source']}")


@app.callback()
def main_callback(debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    state["debug"] = debug


@app.command()
def export(
    model: Optional[Path] = ModelOpt,
    sparsity: str = SparsityOpt,
    target: str = TargetOpt,
    method: str = MethodOpt,
    pattern: str = PatternOpt,
    scope: str = ScopeOpt,
    prune_vae: bool = typer.Option(False, "--prune-vae", help="prune the VAE too"),
    out_dir: Path = typer.Option(Path("bundle"), "--out", "-o", help="bundle directory to write"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="dense-vs-pruned image PSNR gate (dB); default from the profile"),
    image_checks: Optional[int] = ImageChecksOpt,
    image_steps: Optional[int] = ImageStepsOpt,
    alpha: Optional[float] = AlphaOpt,
    beta: Optional[float] = BetaOpt,
    l1: Optional[float] = L1Opt,
    recovery_steps: Optional[int] = RecoveryOpt,
    iterations: Optional[int] = IterationsOpt,
    recovery_target: Optional[str] = RecoveryTargetOpt,
    calibration: Optional[Path] = CalibrationOpt,
    target_macs: Optional[float] = TargetMacsOpt,
    latency_aware: bool = LatencyAwareOpt,
    cost_model: Optional[str] = CostModelOpt,
    recovery_minutes: Optional[float] = RecoveryMinutesOpt,
    quality: Optional[int] = QualityOpt,
    max_fd_ratio: Optional[float] = MaxFdOpt,
    min_accuracy: Optional[float] = MinAccOpt,
    as_json: bool = JsonOpt,
):
    """Prune, bake, export UNet + VAE to ONNX, validate drift, and write a bundle (exit 1 if a gate fails)."""
    from exporter.export import export as do_export

    run(do_export, str(model) if model else None, sparsity, target, method, pattern, scope, prune_vae, out_dir,
        force, min_psnr, log=log, image_checks=image_checks, image_steps=image_steps, as_json=as_json,
        show=show_export, tuning=dict(_tuning(alpha, beta, l1, recovery_steps, iterations, calibration, recovery_target),
                                      structured=_structured(target_macs, latency_aware, cost_model, recovery_minutes)),
        quality=quality,
        max_fd_ratio=max_fd_ratio, min_accuracy=min_accuracy)


@app.command()
def prune(
    model: Optional[Path] = ModelOpt,
    sparsity: str = SparsityOpt,
    target: str = TargetOpt,
    method: str = MethodOpt,
    pattern: str = PatternOpt,
    scope: str = ScopeOpt,
    prune_vae: bool = typer.Option(False, "--prune-vae", help="prune the VAE too"),
    out_dir: Path = typer.Option(Path("pruned"), "--out", "-o", help="pipeline directory to write"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    alpha: Optional[float] = AlphaOpt,
    beta: Optional[float] = BetaOpt,
    l1: Optional[float] = L1Opt,
    recovery_steps: Optional[int] = RecoveryOpt,
    iterations: Optional[int] = IterationsOpt,
    recovery_target: Optional[str] = RecoveryTargetOpt,
    calibration: Optional[Path] = CalibrationOpt,
    target_macs: Optional[float] = TargetMacsOpt,
    latency_aware: bool = LatencyAwareOpt,
    cost_model: Optional[str] = CostModelOpt,
    recovery_minutes: Optional[float] = RecoveryMinutesOpt,
    as_json: bool = JsonOpt,
):
    """Prune and bake only; writes a pipeline dir that diffusers' loaders read back."""
    from exporter.export import prune_to_dir

    run(prune_to_dir, str(model) if model else None, sparsity, target, method, pattern, scope, prune_vae, out_dir,
        force, log=log, as_json=as_json,
        tuning=dict(_tuning(alpha, beta, l1, recovery_steps, iterations, calibration, recovery_target),
                    structured=_structured(target_macs, latency_aware, cost_model, recovery_minutes)),
        show=lambda r: out.print(f"pruned pipeline written to {r['out']}: sparsity "
                                 + ", ".join(f"{c} {s:.4f}" for c, s in r["sparsity"].items())))


@app.command()
def sweep(
    model: Optional[Path] = ModelOpt,
    sparsity: str = typer.Option("0.2,0.3,0.43,0.5,0.6", "--sparsity", "-s", help="comma-separated sparsities"),
    target: str = TargetOpt,
    method: str = MethodOpt,
    pattern: str = PatternOpt,
    quality: int = typer.Option(20, "--quality", help="samples per class at each sparsity"),
    seed: int = typer.Option(1000, "--seed", help="noise seed of the samples (dense and pruned share it)"),
    out_dir: Path = typer.Option(Path("sweep"), "--out", "-o", help="directory for sweep.json and sweep.png"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    as_json: bool = JsonOpt,
):
    """Sparsity-quality curve: FD ratio and class accuracy against dense at each sparsity; table, JSON, plot."""
    from rich.progress import Progress

    from exporter.sweep import parse_sparsities, sweep as do_sweep

    def show(r):
        t = Table(title=f"{r['method']} ({r['pattern']}) on {r['model']}, {r['n_samples']} samples per point, "
                        f"seed {r['seed']}")
        for col in ("sparsity", "FD", "FD ratio", "accuracy", "PSNR dB", "SSIM", "prune s", "gates"):
            t.add_column(col)
        if r["rows"]:
            first = r["rows"][0]
            t.add_row("dense", f"{first['dense_fd']:.2f}", "1.000", f"{first['dense_accuracy']:.3f}", "", "", "", "")
        for row in r["rows"]:
            t.add_row(f"{row['sparsity']:.2f}", f"{row['fd']:.2f}", f"{row['fd_ratio']:.3f}", f"{row['accuracy']:.3f}",
                      _num(row["psnr_db"]), f"{row['ssim']:.3f}", f"{row['prune_seconds']:.1f}",
                      "ok" if row["gates_ok"] else "FAIL")
        out.print(t)
        out.print(f"written: {r['out']}/sweep.json, {r['out']}/sweep.png")

    n = len(run(parse_sparsities, sparsity)) if err.is_terminal else 0
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sweep", total=n)
        run(do_sweep, str(model) if model else None, sparsity, method, pattern, target, out_dir, force, quality, seed,
            log=log if not err.is_terminal else (lambda m: None), progress=lambda: bar.advance(task),
            as_json=as_json, show=show)


@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="the dense pipeline the bundle came from (default: the demo, when the bundle came from it)"),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="dense-vs-pruned image PSNR gate (dB)"),
    image_checks: Optional[int] = ImageChecksOpt,
    image_steps: Optional[int] = ImageStepsOpt,
    dense: Optional[Path] = typer.Option(None, "--dense", help="a dense bundle (same model, --sparsity 0): check its torch-free runtime against the dense PyTorch pipeline too"),
    quality: Optional[int] = QualityOpt,
    max_fd_ratio: Optional[float] = MaxFdOpt,
    min_accuracy: Optional[float] = MinAccOpt,
    as_json: bool = JsonOpt,
):
    """Re-check ONNX vs PyTorch drift, dense vs pruned images, and the torch-free runtime's images; exit 1 when over."""
    from exporter.validate import validate_bundle

    run(validate_bundle, bundle, str(model) if model else None, min_psnr, log=log, image_checks=image_checks,
        image_steps=image_steps, dense=dense, as_json=as_json, show=show_export, quality=quality,
        max_fd_ratio=max_fd_ratio, min_accuracy=min_accuracy)


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle directory"), as_json: bool = JsonOpt):
    """Check every checksum in the manifest and every sparsity claim in the ONNX metadata (exit 1 if off)."""
    from exporter.bundle import verify as do_verify

    def show(r):
        if r["ok"]:
            out.print(f"{r['bundle']}: {r['files']} files match the manifest; all metadata claims hold")
        else:
            for p in r["problems"]:
                err.print(f"  {p}", markup=False)

    run(do_verify, bundle, as_json=as_json, show=show)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="an ONNX file"),
    all_tensors: bool = typer.Option(False, "--all", help="list every prunable initializer, not only sparse ones"),
    as_json: bool = JsonOpt,
):
    """Sparsity per initializer, 2:4 validity along TensorRT's axis, and the tinyprune metadata."""
    from exporter.inspect_onnx import inspect_file

    def show(r):
        t = Table(title=f"{r['file']}: sparsity {r['sparsity']:.4f} over {r['prunable']} prunable weights")
        for col in ("initializer", "shape", "axis", "sparsity", "pattern"):
            t.add_column(col)
        for name, f in r["tensors"].items():
            if all_tensors or f["zeros"]:
                t.add_row(name, "x".join(map(str, f["shape"])), str(f["axis"]), f"{f['sparsity']:.4f}", f["pattern"])
        out.print(t)
        for k, v in r["metadata"].items():
            out.print(f"{k} = {v if len(v) < 100 else v[:97] + '...'}", markup=False)
        for p in r["problems"]:
            err.print(f"claim does not hold: {p}", markup=False)

    run(inspect_file, path, as_json=as_json, show=show)


@app.command()
def profiles(name: Optional[str] = typer.Argument(None, help="show one profile"), as_json: bool = JsonOpt):
    """List device profiles, or show one."""
    from exporter.config import list_profiles, load_profile

    def show_one(p: dict):
        t = Table(title=p["name"], show_header=False)
        for k, v in p.items():
            t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        out.print(t)

    def show_all(rows: list[dict]):
        t = Table(title="device profiles")
        for col in ("name", "aliases", "cc", "sparse TC", "TensorRT", "max opset", "DLA", "description"):
            t.add_column(col)
        for p in rows:
            t.add_row(p["name"], ",".join(p["aliases"]), p["compute_capability"] or "-",
                      "yes" if p["sparse_tensor_cores"] else "no", p["trt_version"] or "-", str(p["max_opset"]),
                      str(p["dla_cores"]), p["description"])
        out.print(t)

    if name:
        run(lambda: load_profile(name).to_dict(), as_json=as_json, show=show_one)
    else:
        run(list_profiles, as_json=as_json, show=show_all)


@app.command()
def build(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="device profile (default: the bundle's)"),
    require_engine: bool = typer.Option(False, "--require-engine", help="exit 3 when engines cannot be built here"),
    dla: bool = typer.Option(False, "--dla", help="put components on a DLA core where the target has one"),
    as_json: bool = JsonOpt,
):
    """TensorRT engines with sparse weights where the target has sparse tensor cores, or the on-device script."""
    from exporter.trt_build import build as do_build

    def show(r):
        if r.get("engines"):
            for comp, e in r["engines"].items():
                s = e["sparse"]
                out.print(f"{comp}: {e['engine']} in {e['seconds']:.1f} s; sparse eligible {len(s['eligible'])}, "
                          f"picked {len(s['picked'])}")
                if s["unpicked_2to4"]:
                    err.print(f"warning: {comp}: 2:4 tensors TensorRT did not run sparse: {', '.join(s['unpicked_2to4'])}", markup=False)
        if r.get("notice"):
            err.print(r["notice"], markup=False)
        out.print(f"build script: {bundle / r['script']}")

    run(do_build, bundle, target, require_engine, dla, as_json=as_json, show=show)


@app.command()
def generate(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    labels: list[int] = typer.Option(..., "--class", "-c", help="class label; repeat for several images"),
    steps: int = typer.Option(20, "--steps", help="denoising steps"),
    seed: int = typer.Option(0, "--seed", help="initial-noise seed (numpy); same seed, same image"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim | euler (default: the bundle's scheduler config)"),
    guidance: float = typer.Option(3.0, "--guidance", help="classifier-free guidance scale"),
    backend: str = typer.Option("ort-cpu", "--backend", "-b", help="ort-cpu | ort-cuda | trt"),
    threads: int = typer.Option(0, "--threads", help="onnxruntime intra-op threads (0: its default)"),
    out_dir: Path = typer.Option(Path("images"), "--out", "-o", help="directory for the PNGs"),
    as_json: bool = JsonOpt,
):
    """Torch-free generation from the bundle (numpy scheduler + onnxruntime/TensorRT) -> PNGs."""
    from exporter.runtime import generate_to_dir

    def run_with_progress():
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err, transient=True) as bar:
                task = bar.add_task("steps", total=None)
                return generate_to_dir(bundle, labels, out_dir, steps, seed, scheduler, guidance, backend, threads,
                                       lambda done, total: bar.update(task, completed=done, total=total))
        return generate_to_dir(bundle, labels, out_dir, steps, seed, scheduler, guidance, backend, threads,
                               lambda done, total: log(f"step {done}/{total}"))

    run(run_with_progress, as_json=as_json,
        show=lambda r: out.print(f"{len(r['files'])} image(s) {r['image_size'][0]}x{r['image_size'][1]} in "
                                 f"{r['out']} ({r['scheduler']}, {r['steps']} steps, {r['backend']}; "
                                 f"{r['seconds']['per_step'] * 1000:.1f} ms/step)"))


def show_bench(r: dict) -> None:
    compare = len(r["models"]) > 1
    t = Table(title=f"bench {r['bundle']} on {r['backend']} ({r['machine']['cpu']}, {r['machine']['cores']} cores; "
                    f"{r['warmup']} warm-up, {r['iters']} iterations, generation {r['gen_iters']} x {r['steps']} steps)")
    for col in ("model", "what", "shape", "p50 ms", "p90 ms", "mean ms", "peak RSS MB") + (("CUDA MB",) if r["backend"] == "torch-cuda" else ()) + (("speed-up p50",) if compare else ()):
        t.add_column(col, justify="left" if col in ("model", "what", "shape") else "right",
                     no_wrap=col in ("model", "what"))
    for row in r["rows"]:
        cells = [row["model"], row["what"], row["shape"], f"{row['p50_ms']:.3f}", f"{row['p90_ms']:.3f}",
                 f"{row['mean_ms']:.3f}", "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.1f}"]
        if r["backend"] == "torch-cuda":
            cells.append("-" if row["cuda_peak_mb"] is None else f"{row['cuda_peak_mb']:.1f}")
        if compare:
            s = r["speedup_p50"].get(row["what"]) if row["model"] == "pruned" else None
            cells.append(f"{s:.2f}x" if s else "")
        t.add_row(*cells)
    out.print(t)
    for key, b in r["budgets"].items():
        out.print(f"budget {key} ({r['profile']}): p50 {b['p50_ms']:.3g} ms <= {b['budget_ms']:.3g} ms: "
                  f"{'ok' if b['ok'] else 'OVER'}")


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    backend: str = typer.Option("ort-cpu", "--backend", "-b", help="ort-cpu | ort-cuda | trt | torch | torch-cuda"),
    warmup: int = typer.Option(3, "--warmup", help="untimed calls before timing"),
    iters: int = typer.Option(20, "--iters", "-n", help="timed calls per component"),
    gen_iters: int = typer.Option(3, "--gen-iters", help="timed whole generations"),
    steps: int = typer.Option(20, "--steps", help="denoising steps of the whole-generation figure"),
    threads: int = typer.Option(0, "--threads", help="intra-op threads (0: the backend's default)"),
    compare: bool = typer.Option(False, "--compare", help="dense and pruned side by side, iterations interleaved"),
    dense: Optional[Path] = typer.Option(None, "--dense", help="dense bundle for --compare (default: export the source pipeline's dense components to a temp dir)"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="the dense pipeline the bundle came from (default: the demo, when the bundle came from it)"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="profile whose latency budgets apply (default: the bundle's)"),
    no_generation: bool = typer.Option(False, "--no-generation", help="components only"),
    no_memory: bool = typer.Option(False, "--no-memory", help="skip the peak-memory probes (one subprocess per row)"),
    as_json: bool = JsonOpt,
):
    """Latency p50/p90/mean and peak memory per component and per generation; exit 1 over the profile's budgets."""
    from exporter.bench import bench as do_bench

    run(do_bench, bundle, backend, warmup, iters, gen_iters, steps, threads, compare, dense,
        str(model) if model else None, target, not no_generation, not no_memory, log=log, as_json=as_json,
        show=show_bench)


def _terminated(signum, frame):
    # CI cancels a job with SIGTERM: unwind like Ctrl-C so that the staging dir is removed (bundle.staged)
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if state["debug"]:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
