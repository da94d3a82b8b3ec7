"""tinyprune command line: parse, call one exporter function, print, map errors to exit codes.

Heavy modules (torch, diffusers, onnx, tensorrt) are imported inside the commands so that
`tinyprune --help` stays fast and works without them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import NamedTuple, Optional

import typer
from rich.console import Console
from rich.table import Table

from tinyprune.config import STRUCTURED_METHODS
from tinyprune.errors import TinypruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune diffusers pipelines and export them as ONNX / TensorRT bundles for edge devices.")
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)
state = {"debug": False}

# help panels of the options, the same in every command
INPUT, METHOD, RECOVERY, STRUCTURED, GATES, OUTPUT = ("Input and target", "Method", "Recovery", "Structured", "Gates",
                                                      "Output")
COMPUTE = "Compute"  # the prune stage's device, precision and memory; data-parallel under a launcher


# Choices: --help lists them, a wrong value is one line and exit 2. The commands pass `.value` on, so the code
# below the CLI sees the plain strings it validates against (config.py, bench/latency.py; tests/test_cli.py holds
# these to them).
class Method(str, Enum):
    magnitude = "magnitude"
    l1_grad = "l1-grad"
    diff_pruning = "diff-pruning"
    ld_pruner = "ld-pruner"
    ecodiff = "ecodiff"
    auto = "auto"


class Pattern(str, Enum):
    unstructured = "unstructured"
    two_four = "2:4"
    auto = "auto"
    channel = "channel"


class Scope(str, Enum):
    global_ = "global"
    layer = "layer"


class CostModel(str, Enum):
    ort = "ort"
    macs = "macs"


class RecoveryTarget(str, Enum):
    distill = "distill"
    noise = "noise"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    auto = "auto"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class MixedPrecision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class BenchBackend(str, Enum):
    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    trt = "trt"
    torch = "torch"
    torch_cuda = "torch-cuda"


def _choice(enum: type[Enum], unknown: str):
    """typer `parser=` of an Enum option: a value outside it is one `error:` line and exit 2, worded as the
    library's own check words it (`unknown` takes the value and the known ones), not typer's usage box."""

    def parse(value):
        if isinstance(value, enum):
            return value
        try:
            return enum(value)
        except ValueError:
            err.print("error: " + unknown.format(value, ", ".join(m.value for m in enum)), markup=False)
            raise typer.Exit(2) from None

    return parse


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


def _compute(device, mixed_precision, gradient_checkpointing: bool) -> dict:
    """The prune stage's compute options (config.ComputeSpec's fields)."""
    return {"device": device.value, "mixed_precision": _value(mixed_precision),
            "gradient_checkpointing": gradient_checkpointing}


ModelOpt = typer.Option(None, "--model", "-m", help="diffusers pipeline dir (default: the shipped demo pipeline)",
                        rich_help_panel=INPUT)
TargetOpt = typer.Option("jetson", "--target", "-t", help="device profile name or alias, or a .toml path",
                         rich_help_panel=INPUT)
SparsityOpt = typer.Option("0.43", "--sparsity", "-s", help="fraction of prunable weights set to zero, in [0, 1)",
                           rich_help_panel=INPUT)
MethodOpt = typer.Option(Method.magnitude, "--method", parser=_choice(Method, "unknown --method '{}'; known methods: {}"),
                         rich_help_panel=METHOD,
                         help="importance method: magnitude | l1-grad (alpha|w| + beta|dL/dw|, "
                         "iterative with L1 recovery) | diff-pruning | ld-pruner | ecodiff (structured: channels and "
                         "heads removed, pattern channel) | auto (2:4 where the target has sparse tensor cores, else "
                         "structured)")
PatternOpt = typer.Option(Pattern.unstructured, "--pattern", rich_help_panel=METHOD,
                          parser=_choice(Pattern, "unknown --pattern '{}'; known patterns: {}"),
                          help="unstructured | 2:4 | auto (2:4 where the target has sparse tensor cores) | channel (set by the structured methods)")
ScopeOpt = typer.Option(Scope.global_, "--scope", parser=_choice(Scope, "unknown --scope '{}'; known scopes: {}"),
                        rich_help_panel=METHOD,
                        help="global (one threshold over all layers) | layer (same sparsity per layer)")
QualityOpt = typer.Option(None, "--quality", help="digit-yardstick samples per class for the FD/accuracy gates (default 10; 0 skips)",
                          rich_help_panel=GATES)
MaxFdOpt = typer.Option(None, "--max-fd-ratio", help="gate: pruned FD / dense FD at most this (default from the profile)",
                        rich_help_panel=GATES)
MinAccOpt = typer.Option(None, "--min-accuracy", help="gate: class accuracy of pruned samples at least this (default from the profile)",
                         rich_help_panel=GATES)
JsonOpt = typer.Option(False, "--json", help="print the machine-readable result on stdout", rich_help_panel=OUTPUT)
ImageChecksOpt = typer.Option(None, "--image-checks", min=0, rich_help_panel=GATES,
                              help="conditions sampled for the dense-vs-pruned image gate (default: all; 0 skips "
                                   "the gate, e.g. for Stable-Diffusion-sized models on a CPU)")
ImageStepsOpt = typer.Option(None, "--image-steps", min=1, help="sampler steps of the image gate (default 20)",
                             rich_help_panel=GATES)
AlphaOpt = typer.Option(None, "--alpha", help="l1-grad: weight of the |w| term (default 1.0; terms normalised to mean 1)",
                        rich_help_panel=METHOD)
BetaOpt = typer.Option(None, "--beta", help="l1-grad: weight of the |dL/dw| term (default 1.0; 0 = magnitude ranking)",
                       rich_help_panel=METHOD)
L1Opt = typer.Option(None, "--l1", help="recovery: lambda of the lambda*sum|w| penalty (default 1e-5)",
                     rich_help_panel=RECOVERY)
RecoveryOpt = typer.Option(None, "--recovery-steps", help="Adam steps on calibration batches after pruning, masks "
                           "held (default 200 for l1-grad, 300 for structured methods, 0 for magnitude)",
                           rich_help_panel=RECOVERY)
IterationsOpt = typer.Option(None, "--iterations", help="l1-grad: prune steps towards the target, with regrowth "
                             "between them (default 4)", rich_help_panel=METHOD)
RecoveryTargetOpt = typer.Option(None, "--recovery-target", rich_help_panel=RECOVERY,
                                 parser=_choice(RecoveryTarget, "unknown --recovery-target '{}'; known: {}"),
                                 help="recovery's target: distill (the dense UNet's "
                                 "output; default) | noise (the true noise: no second UNet copy in memory)")
CalibrationOpt = typer.Option(None, "--calibration", help="folder of images for calibration batches (default: "
                              "data-free, the dense model's own samples)", rich_help_panel=INPUT)
CalibrationSamplesOpt = typer.Option(None, "--calibration-samples", rich_help_panel=INPUT,
                                     help="how many latents calibration, scoring and recovery read: data-free samples "
                                          "of the dense model (default 40 prompts, fewer when the pipeline's own "
                                          "prompts.txt is short; 200 for a structured method's distillation) or "
                                          "images of --calibration (default at most 256); "
                                          "more makes recovery generalise, at sampling and scoring time")


TargetMacsOpt = typer.Option(None, "--target-macs", help="structured: fraction of the dense UNet's MACs to keep, in "
                             "(0, 1]; replaces --sparsity as the target", rich_help_panel=STRUCTURED)
LatencyAwareOpt = typer.Option(None, "--latency-aware/--no-latency-aware", help="structured: weigh each group by "
                               "its measured onnxruntime CPU time (or MACs, --cost-model macs) instead of its "
                               "parameters (default: on for targets without sparse tensor cores)",
                               rich_help_panel=STRUCTURED, show_default=False)
SpeedupOpt = typer.Option(None, "--speedup", help="structured: the UNet's speed-up over the dense one to reach, on "
                          "the cost model (measured onnxruntime time on CPU targets, MACs on GPU ones); replaces "
                          "--sparsity as the target", rich_help_panel=STRUCTURED)
LatencyBudgetOpt = typer.Option(None, "--latency-budget-ms", help="structured, CPU targets: the UNet call's "
                                "onnxruntime time here (batch 2) to stay within; replaces --sparsity as the target",
                                rich_help_panel=STRUCTURED)
CostModelOpt = typer.Option(None, "--cost-model", help="structured, latency-aware: ort (measured) | macs "
                            "(default: ort on CPU targets, macs on GPU targets)",
                            parser=_choice(CostModel, "unknown --cost-model '{}'; known: {}"),
                            rich_help_panel=STRUCTURED)
RecoveryMinutesOpt = typer.Option(None, "--recovery-minutes", help="structured: wall-time cap of the recovery "
                                  "distillation (--recovery-steps steps, default 2000 for structured "
                                  "methods; the learning rate decays over whichever ends the run first)",
                                  rich_help_panel=STRUCTURED)
PrecisionOpt = typer.Option(Precision.fp32, "--precision", parser=_choice(Precision, "unknown --precision '{}'; known: {}"),
                            help="ONNX precision: fp32 | fp16 (GPU targets) | int8 (QDQ UNet, calibrated here) | "
                                 "auto (from the target and the UNet's size)", rich_help_panel=METHOD)
DeviceOpt = typer.Option(Device.auto, "--device", parser=_choice(Device, "unknown --device '{}'; known: {}"),
                         rich_help_panel=COMPUTE, help="where calibration, scoring and recovery run: auto (CUDA when "
                         "torch sees a GPU) | cpu | cuda (exit 3 without one); baking and saving stay fp32 on the CPU")
MixedPrecisionOpt = typer.Option(None, "--mixed-precision", rich_help_panel=COMPUTE,
                                 parser=_choice(MixedPrecision, "unknown --mixed-precision '{}'; known: {}"),
                                 help="autocast of calibration, scoring and recovery: no | bf16 | fp16 (default: "
                                 "accelerate launch's --mixed_precision, else no)")
CheckpointingOpt = typer.Option(False, "--gradient-checkpointing", rich_help_panel=COMPUTE,
                                help="recompute the UNet's blocks in the backward passes of recovery and EcoDiff "
                                "instead of keeping their activations (less GPU memory, more time)")
ForceOpt = typer.Option(False, "--force", help="replace an existing --out", rich_help_panel=OUTPUT)
PruneVaeOpt = typer.Option(False, "--prune-vae", help="prune the VAE too", rich_help_panel=METHOD)
PruneTextOpt = typer.Option(False, "--prune-text-encoder", help="prune the text encoder(s) too (their Linear "
                            "layers; unstructured and 2:4)", rich_help_panel=METHOD)


class Applies(NamedTuple):
    """Where a method-specific option is read: by these --method values, not with these --pattern values, and
    only together with `needs` (an option it modifies)."""

    methods: tuple[str, ...]
    not_patterns: tuple[str, ...] = ()
    needs: str | None = None


# Each option's field, by what reads it in exporter/prune (grep the field). Given where nothing reads it, the
# option is refused before any work (one line, exit 2) instead of silently ignored. --method auto becomes
# l1-grad or a structured method only once the target is loaded (PruneSpec.resolve): it passes the methods check.
APPLIES = {
    "alpha": Applies(("l1-grad",)),
    "beta": Applies(("l1-grad",)),
    "iterations": Applies(("l1-grad",), ("2:4",)),  # l1-grad's 2:4 scores once, no prune steps
    "l1": Applies(("magnitude", "l1-grad")),  # structured recovery distils without the L1 term
    "recovery_target": Applies(("magnitude", "l1-grad")),  # structured recovery always distils
    "target_macs": Applies(STRUCTURED_METHODS, ("2:4",)),  # structured: channels and heads go, never 2:4
    "latency_aware": Applies(STRUCTURED_METHODS, ("2:4",)),
    "cost_model": Applies(STRUCTURED_METHODS, ("2:4",)),
    "speedup": Applies(STRUCTURED_METHODS, ("2:4",)),
    "latency_budget_ms": Applies(STRUCTURED_METHODS, ("2:4",)),
    "recovery_minutes": Applies(STRUCTURED_METHODS, ("2:4",)),
    "prune_text_encoder": Applies(("magnitude", "l1-grad")),  # structured methods reshape the UNet only
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_applies(method: str, pattern: str, tuning: dict) -> None:
    """Refuse an option of `tuning` (the workflows' dict: _tuning + structured) that APPLIES says the chosen
    --method or --pattern never reads: one `error:` line, exit 2."""
    values = dict(tuning)
    values.update(values.pop("structured", None) or {})
    given = {field for field, v in values.items() if v is not None and v is not False}
    for field, rule in APPLIES.items():  # in the table's order: the same first complaint every run
        if field not in given:
            continue
        if method != "auto" and method not in rule.methods:
            problem = f"applies to --method {', '.join(rule.methods)} only (got {method})"
        elif pattern in rule.not_patterns:
            problem = f"does not apply to --pattern {pattern}"
        elif rule.needs and rule.needs not in given:
            problem = f"applies with {_flag(rule.needs)} only"
        else:
            continue
        err.print(f"error: {_flag(field)} {problem}", markup=False)
        raise typer.Exit(2)


def _structured(target_macs, latency_aware, cost_model, recovery_minutes, speedup, latency_budget_ms) -> dict:
    return {"target_macs": target_macs, "latency_aware": latency_aware, "cost_model": cost_model,
            "recovery_minutes": recovery_minutes, "speedup": speedup, "latency_budget_ms": latency_budget_ms}


def _tuning(alpha, beta, l1, recovery_steps, iterations, calibration, recovery_target, calibration_samples) -> dict:
    return {"alpha": alpha, "beta": beta, "l1": l1, "recovery_steps": recovery_steps, "iterations": iterations,
            "recovery_target": recovery_target, "calibration": str(calibration) if calibration else None,
            "calibration_samples": calibration_samples}


def log(msg: str) -> None:
    err.print(f"[dim]tinyprune:[/dim] {msg}")


def _plain(result):
    """What JSON and the show functions take: a result's to_dict() (frozen dataclass results), else itself."""
    return result.to_dict() if hasattr(result, "to_dict") else result


def run(fn, *args, as_json: bool = False, show=None, **kwargs):
    """Call one exporter function; one line on stderr and the right exit code for every failure."""
    try:
        result = fn(*args, **kwargs)
    except TinypruneError as e:
        if state["debug"]:
            raise
        partial = getattr(e, "result", None)  # a GateFailed's result: shown, then the gate's line
        if as_json and partial is not None:
            print(json.dumps(_plain(partial), indent=2, default=str))
        elif partial is not None and show:
            show(_plain(partial))
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
        print(json.dumps(_plain(result), indent=2, default=str))
    elif show:
        show(_plain(result))
    return result


def _num(x) -> str:
    """A figure of a result's to_dict(), where an infinite one (identical images, dense FD 0) is None."""
    if x is None:
        return "inf"
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
    if img["skipped"]:
        t.add_row(img["name"], f"skipped ({img['reason']})", f">= {img['min_psnr_db']} dB", "-")
    else:
        t.add_row(img["name"], f"PSNR {_num(img['psnr_db'])} dB", f">= {img['min_psnr_db']} dB",
                  "yes" if img["ok"] else "NO")
    for d in r.get("runtime_drift", []):
        if d["skipped"]:
            t.add_row(d["name"], f"skipped ({d['reason']})", f">= {d['min_psnr_db']} dB", "-")
        else:
            t.add_row(d["name"], f"PSNR {_num(d['psnr_db'])} dB, max abs {d['max_abs']:.2g}",
                      f">= {d['min_psnr_db']} dB", "yes" if d["ok"] else "NO")
    q = r.get("quality")
    if q:
        t.add_row(f"FD ratio pruned/dense ({q['n_samples']} samples)",
                  f"{'inf' if q['fd_ratio'] is None else format(q['fd_ratio'], '.3f')} "
                  f"(FD {q['pruned']['fd']:.3g} vs {q['dense']['fd']:.3g})",
                  f"<= {q['max_fd_ratio']}", "yes" if q["fd_ok"] else "NO")
        t.add_row("class accuracy pruned (dense)", f"{q['pruned']['accuracy']:.3f} ({q['dense']['accuracy']:.3f})",
                  f">= {q['min_accuracy']}", "yes" if q["accuracy_ok"] else "NO")
        t.add_row("PSNR / SSIM pruned vs dense", f"{_num(q['psnr_db'])} dB / {q['ssim']:.3f}", "", "")
    for comp, s in (r.get("pruning") or {}).items():
        v = s.get("speedup")
        if v:
            asked = f"{v['speedup']:g}x" if v.get("speedup") else f"{v['budget_ms']:g} ms"
            got = f"measured {v['measured']['speedup']:.2f}x here" if v.get("measured") else "not measured here"
            t.add_row(f"{comp} latency target {asked}", f"predicted {v['predicted_speedup']:.2f}x, {got}",
                      f">= {v['wanted']:g}x" if v.get("measured") else "", "" if not v.get("measured")
                      else "yes" if v.get("met") else "NO")
    out.print(t)
    p = r.get("precision") or {}
    if p.get("precision", "fp32") != "fp32":
        kept = {c: len(v["kept_float"]) for c, v in p["components"].items() if v["kept_float"]}
        m = p.get("unet_measured")
        out.print(f"precision {p['precision']}: " + ", ".join(p["components"])
                  + (f" (nodes kept float: {', '.join(f'{c} {n}' for c, n in kept.items())})" if kept else "")
                  + (f"; unet {m['speedup']:.2f}x fp32 on onnxruntime CPU here" if m else ""))
    out.print(f"speed-up source: {r['speedup_source']}")


@app.callback()
def main_callback(debug: bool = typer.Option(False, "--debug", help="show tracebacks", rich_help_panel=OUTPUT)):
    state["debug"] = debug


@app.command()
def export(  # parameters in help-panel order: input and target, method, recovery, structured, gates, output
    model: Optional[Path] = ModelOpt,
    sparsity: str = SparsityOpt,
    target: str = TargetOpt,
    calibration: Optional[Path] = CalibrationOpt,
    calibration_samples: Optional[int] = CalibrationSamplesOpt,
    method: Method = MethodOpt,
    pattern: Pattern = PatternOpt,
    scope: Scope = ScopeOpt,
    prune_vae: bool = PruneVaeOpt,
    prune_text_encoder: bool = PruneTextOpt,
    alpha: Optional[float] = AlphaOpt,
    beta: Optional[float] = BetaOpt,
    iterations: Optional[int] = IterationsOpt,
    recovery_steps: Optional[int] = RecoveryOpt,
    l1: Optional[float] = L1Opt,
    recovery_target: Optional[RecoveryTarget] = RecoveryTargetOpt,
    target_macs: Optional[float] = TargetMacsOpt,
    latency_aware: Optional[bool] = LatencyAwareOpt,
    speedup: Optional[float] = SpeedupOpt,
    latency_budget_ms: Optional[float] = LatencyBudgetOpt,
    cost_model: Optional[CostModel] = CostModelOpt,
    recovery_minutes: Optional[float] = RecoveryMinutesOpt,
    precision: Precision = PrecisionOpt,
    device: Device = DeviceOpt,
    mixed_precision: Optional[MixedPrecision] = MixedPrecisionOpt,
    gradient_checkpointing: bool = CheckpointingOpt,
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="dense-vs-pruned image PSNR gate (dB); default from the profile",
                                             rich_help_panel=GATES),
    image_checks: Optional[int] = ImageChecksOpt,
    image_steps: Optional[int] = ImageStepsOpt,
    quality: Optional[int] = QualityOpt,
    max_fd_ratio: Optional[float] = MaxFdOpt,
    min_accuracy: Optional[float] = MinAccOpt,
    out_dir: Path = typer.Option(Path("bundle"), "--out", "-o", help="bundle directory to write", rich_help_panel=OUTPUT),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Prune, bake, export UNet + VAE to ONNX, validate drift, and write a bundle (exit 1 if a gate fails)."""
    tuning = dict(_tuning(alpha, beta, l1, recovery_steps, iterations, calibration, _value(recovery_target),
                          calibration_samples),
                  structured=_structured(target_macs, latency_aware, _value(cost_model), recovery_minutes, speedup,
                                         latency_budget_ms),
                  prune_text_encoder=prune_text_encoder,
                  compute=_compute(device, mixed_precision, gradient_checkpointing))
    _check_applies(method.value, pattern.value, tuning)  # before the heavy imports and any work
    from tinyprune.workflows.export import export as do_export

    run(do_export, str(model) if model else None, sparsity, target, method.value, pattern.value, scope.value, prune_vae,
        out_dir, force, min_psnr, log=log, image_checks=image_checks, image_steps=image_steps, as_json=as_json,
        show=show_export, tuning=tuning, quality=quality,
        max_fd_ratio=max_fd_ratio, min_accuracy=min_accuracy, precision=precision.value)


@app.command()
def prune(  # parameters in help-panel order, as export's
    model: Optional[Path] = ModelOpt,
    sparsity: str = SparsityOpt,
    target: str = TargetOpt,
    calibration: Optional[Path] = CalibrationOpt,
    calibration_samples: Optional[int] = CalibrationSamplesOpt,
    method: Method = MethodOpt,
    pattern: Pattern = PatternOpt,
    scope: Scope = ScopeOpt,
    prune_vae: bool = PruneVaeOpt,
    prune_text_encoder: bool = PruneTextOpt,
    alpha: Optional[float] = AlphaOpt,
    beta: Optional[float] = BetaOpt,
    iterations: Optional[int] = IterationsOpt,
    recovery_steps: Optional[int] = RecoveryOpt,
    l1: Optional[float] = L1Opt,
    recovery_target: Optional[RecoveryTarget] = RecoveryTargetOpt,
    target_macs: Optional[float] = TargetMacsOpt,
    latency_aware: Optional[bool] = LatencyAwareOpt,
    speedup: Optional[float] = SpeedupOpt,
    latency_budget_ms: Optional[float] = LatencyBudgetOpt,
    cost_model: Optional[CostModel] = CostModelOpt,
    recovery_minutes: Optional[float] = RecoveryMinutesOpt,
    device: Device = DeviceOpt,
    mixed_precision: Optional[MixedPrecision] = MixedPrecisionOpt,
    gradient_checkpointing: bool = CheckpointingOpt,
    out_dir: Path = typer.Option(Path("pruned"), "--out", "-o", help="pipeline directory to write", rich_help_panel=OUTPUT),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Prune and bake only; writes a pipeline dir that diffusers' loaders read back. Under `accelerate launch` or
    `torchrun` each process is a data-parallel rank and only rank 0 writes."""
    tuning = dict(_tuning(alpha, beta, l1, recovery_steps, iterations, calibration, _value(recovery_target),
                          calibration_samples),
                  structured=_structured(target_macs, latency_aware, _value(cost_model), recovery_minutes, speedup,
                                         latency_budget_ms),
                  prune_text_encoder=prune_text_encoder,
                  compute=_compute(device, mixed_precision, gradient_checkpointing))
    _check_applies(method.value, pattern.value, tuning)  # before the heavy imports and any work
    from tinyprune.workflows.export import prune_to_dir

    main_rank = os.environ.get("RANK", "0") == "0"  # under a launcher only rank 0 prints, as only it writes
    run(prune_to_dir, str(model) if model else None, sparsity, target, method.value, pattern.value, scope.value,
        prune_vae, out_dir, force, log=log, as_json=as_json and main_rank, tuning=tuning,
        show=None if not main_rank else
        lambda r: out.print(f"pruned pipeline written to {r['out']}: sparsity "
                            + ", ".join(f"{c} {s:.4f}" for c, s in r["sparsity"].items())))


@app.command()
def sweep(
    model: Optional[Path] = ModelOpt,
    method: str = typer.Option("magnitude", "--method", rich_help_panel=METHOD,
                               help="comma-separated methods, e.g. magnitude,l1-grad,diff-pruning,ld-pruner,ecodiff"),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", rich_help_panel=INPUT,
                                           help="comma-separated sparsities (default 0.2,0.3,0.43,0.5,0.6; with "
                                                "--speedup: 0.43, for the methods that only make zeros)"),
    speedup: Optional[str] = typer.Option(None, "--speedup", rich_help_panel=INPUT,
                                          help="comma-separated UNet speed-ups for the structured methods (as "
                                               "export --speedup); the others run at --sparsity"),
    target: str = TargetOpt,
    pattern: Pattern = PatternOpt,
    calibration_samples: Optional[int] = CalibrationSamplesOpt,
    quality: int = typer.Option(20, "--quality", help="samples per class at each point", rich_help_panel=GATES),
    seed: int = typer.Option(1000, "--seed", help="noise seed of the samples (dense and pruned share it)",
                             rich_help_panel=GATES),
    out_dir: Path = typer.Option(Path("sweep"), "--out", "-o",
                                 help="directory for sweep.json, sweep.png and pareto.png", rich_help_panel=OUTPUT),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Methods x targets: each point's UNet timed against dense on onnxruntime CPU here, FD ratio and class
    accuracy against dense; table, JSON, sparsity plot and the speed-up/quality Pareto plot."""
    from rich.progress import Progress

    from tinyprune.workflows.sweep import count, sweep as do_sweep

    def show(r):
        t = Table(title=f"{r['method']} on {r['model']} ({r['profile']}), {r['n_samples']} samples per point, "
                        f"seed {r['seed']}; UNet timed on onnxruntime CPU here, batch 2")
        for col in ("method", "target", "removed", "UNet speed-up", "FD", "FD ratio", "accuracy", "PSNR dB", "SSIM",
                    "prune s", "gates", "front"):
            t.add_column(col)
        if r["rows"]:
            first = r["rows"][0]
            t.add_row("dense", "", "0", "1.00x", f"{first['dense_fd']:.2f}", "1.000", f"{first['dense_accuracy']:.3f}",
                      "", "", "", "", "")
        for row in r["rows"]:
            asked = (f"{row['speedup_asked']:g}x" if row["target"] == "speedup"
                     else f"{row['sparsity']:.2f}") + ("" if row["pattern"] in ("unstructured", "channel")
                                                       else f" {row['pattern']}")
            front = "/".join(k for k, f in (("FD", "pareto_fd"), ("acc", "pareto_accuracy")) if row[f])
            t.add_row(row["method"], asked, f"{row['achieved']:.3f}", f"{row['speedup']:.2f}x", f"{row['fd']:.2f}",
                      f"{row['fd_ratio']:.3f}", f"{row['accuracy']:.3f}", _num(row["psnr_db"]), f"{row['ssim']:.3f}",
                      f"{row['prune_seconds']:.1f}", "ok" if row["gates_ok"] else "FAIL", front)
        out.print(t)
        out.print(f"written: {r['out']}/sweep.json, {r['out']}/sweep.png, {r['out']}/pareto.png")

    n = run(count, method, sparsity, speedup, pattern.value, target, calibration_samples) if err.is_terminal else 0
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sweep", total=n)
        run(do_sweep, str(model) if model else None, sparsity, method, pattern.value, target, out_dir, force,
            quality, seed, speedup, calibration_samples, log=log if not err.is_terminal else (lambda m: None),
            progress=lambda: bar.advance(task), as_json=as_json, show=show)


@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="the dense pipeline the bundle came from (default: the demo, when the bundle came from it)",
                                         rich_help_panel=INPUT),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="dense-vs-pruned image PSNR gate (dB)",
                                             rich_help_panel=GATES),
    image_checks: Optional[int] = ImageChecksOpt,
    image_steps: Optional[int] = ImageStepsOpt,
    dense: Optional[Path] = typer.Option(None, "--dense", help="a dense bundle (same model, --sparsity 0): check its torch-free runtime against the dense PyTorch pipeline too",
                                         rich_help_panel=INPUT),
    quality: Optional[int] = QualityOpt,
    max_fd_ratio: Optional[float] = MaxFdOpt,
    min_accuracy: Optional[float] = MinAccOpt,
    as_json: bool = JsonOpt,
):
    """Re-check ONNX vs PyTorch drift, dense vs pruned images, and the torch-free runtime's images; exit 1 when over."""
    from tinyprune.workflows.validate import validate_bundle

    run(validate_bundle, bundle, str(model) if model else None, min_psnr, log=log, image_checks=image_checks,
        image_steps=image_steps, dense=dense, as_json=as_json, show=show_export, quality=quality,
        max_fd_ratio=max_fd_ratio, min_accuracy=min_accuracy)


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    target: Optional[str] = typer.Option(None, "--target", "-t", rich_help_panel=INPUT,
                                         help="device profile whose TensorRT parser must take every ONNX file "
                                              "(opset and ops; default: the bundle's profile)"),
    as_json: bool = JsonOpt,
):
    """Check every checksum in the manifest, every sparsity claim in the ONNX metadata, and that the target's
    TensorRT parser takes every ONNX file (exit 1 if off)."""
    from tinyprune.ship.verify import verify as do_verify

    def show(r):
        if r["ok"]:
            parser = (f"; every ONNX file's opset and ops are ones TensorRT {r['trt_version']} ({r['target']}) "
                      "parses" if r["trt_version"] else f"; every ONNX file within {r['target']}'s max opset"
                      if r["target"] else "")
            out.print(f"{r['bundle']}: {r['files']} files match the manifest; all metadata claims hold{parser}")
            if set(r["precision"].values()) - {"fp32"}:
                out.print("precision: " + ", ".join(f"{c} {p}" for c, p in r["precision"].items()))
        else:
            for p in r["problems"]:
                err.print(f"  {p}", markup=False)

    run(do_verify, bundle, target, as_json=as_json, show=show)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="an ONNX file"),
    all_tensors: bool = typer.Option(False, "--all", help="list every prunable initializer, not only sparse ones",
                                     rich_help_panel=OUTPUT),
    as_json: bool = JsonOpt,
):
    """Sparsity per initializer, 2:4 validity along TensorRT's axis, and the tinyprune metadata."""
    from tinyprune.export.inspection import inspect_file

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
    from tinyprune.config import list_profiles, load_profile

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
    target: Optional[str] = typer.Option(None, "--target", "-t", help="device profile (default: the bundle's)",
                                         rich_help_panel=INPUT),
    dla: bool = typer.Option(False, "--dla", help="put components on a DLA core where the target has one",
                             rich_help_panel=METHOD),
    require_engine: bool = typer.Option(False, "--require-engine", help="exit 3 when engines cannot be built here",
                                        rich_help_panel=GATES),
    as_json: bool = JsonOpt,
):
    """TensorRT engines with sparse weights where the target has sparse tensor cores, or the on-device script."""
    from tinyprune.ship.tensorrt import build as do_build

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
    prompts: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="prompt (text bundles); repeat for several",
                                                rich_help_panel=INPUT),
    num_images: int = typer.Option(1, "--num-images", "-n", help="images per prompt (unconditional: in all)",
                                   rich_help_panel=INPUT),
    steps: int = typer.Option(20, "--steps", help="denoising steps", rich_help_panel=METHOD),
    seed: int = typer.Option(0, "--seed", help="initial-noise seed (numpy); same seed, same image",
                             rich_help_panel=METHOD),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim | euler | euler-a | pndm | dpm++ | lcm | "
                                            "ddpm (default: the bundle's scheduler config)", rich_help_panel=METHOD),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale, an LCM's "
                                             "embedded one (default: the family's: 7.5 SD, 5 SDXL, 8.5 LCM, 3 the demo)",
                                             rich_help_panel=METHOD),
    backend: str = typer.Option("ort-cpu", "--backend", "-b", help="ort-cpu | ort-cuda | trt", rich_help_panel=INPUT),
    threads: int = typer.Option(0, "--threads", help="onnxruntime intra-op threads (0: its default)",
                                rich_help_panel=INPUT),
    out_dir: Path = typer.Option(Path("images"), "--out", "-o", help="directory for the PNGs", rich_help_panel=OUTPUT),
    as_json: bool = JsonOpt,
):
    """Torch-free generation from the bundle (numpy scheduler + onnxruntime/TensorRT) -> PNGs."""
    from tinyprune.runtime.generate import generate_to_dir

    def go(progress):
        return generate_to_dir(bundle, out_dir, prompts, num_images, steps, seed, scheduler, guidance, backend,
                               threads, progress)

    def run_with_progress():
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err, transient=True) as bar:
                task = bar.add_task("steps", total=None)
                return go(lambda done, total: bar.update(task, completed=done, total=total))
        return go(lambda done, total: log(f"step {done}/{total}"))

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
    backend: BenchBackend = typer.Option(BenchBackend.ort_cpu, "--backend", "-b", rich_help_panel=INPUT,
                                         parser=_choice(BenchBackend, "unknown backend '{}'; known: {}"),
                                         help="onnxruntime CPU / CUDA, the bundle's TensorRT engines, or its pruned/ "
                                              "pipeline in PyTorch"),
    warmup: int = typer.Option(3, "--warmup", help="untimed calls before timing", rich_help_panel=METHOD),
    iters: int = typer.Option(20, "--iters", "-n", help="timed calls per component", rich_help_panel=METHOD),
    gen_iters: int = typer.Option(3, "--gen-iters", help="timed whole generations", rich_help_panel=METHOD),
    steps: int = typer.Option(20, "--steps", help="denoising steps of the whole-generation figure",
                              rich_help_panel=METHOD),
    threads: int = typer.Option(0, "--threads", help="intra-op threads (0: the backend's default)",
                                rich_help_panel=INPUT),
    compare: bool = typer.Option(False, "--compare", help="dense and pruned side by side, iterations interleaved",
                                 rich_help_panel=METHOD),
    dense: Optional[Path] = typer.Option(None, "--dense", help="dense bundle for --compare (default: export the source pipeline's dense components to a temp dir)",
                                         rich_help_panel=INPUT),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="the dense pipeline the bundle came from (default: the demo, when the bundle came from it)",
                                         rich_help_panel=INPUT),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="profile whose latency budgets apply (default: the bundle's)",
                                         rich_help_panel=GATES),
    no_generation: bool = typer.Option(False, "--no-generation", help="components only", rich_help_panel=METHOD),
    no_memory: bool = typer.Option(False, "--no-memory", help="skip the peak-memory probes (one subprocess per row)",
                                   rich_help_panel=METHOD),
    as_json: bool = JsonOpt,
):
    """Latency p50/p90/mean and peak memory per component and per generation; exit 1 over the profile's budgets."""
    from tinyprune.bench.latency import bench as do_bench

    run(do_bench, bundle, backend.value, warmup, iters, gen_iters, steps, threads, compare, dense,
        str(model) if model else None, target, not no_generation, not no_memory, log=log, as_json=as_json,
        show=show_bench)


@app.command("bench-merge")
def bench_merge(
    files: list[Path] = typer.Argument(..., help="bench JSONs written by `python -m tinyprune.runtime bench BUNDLE "
                                                 "--out F` on each board"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="write boards.md, boards.json, boards.png here",
                                           rich_help_panel=OUTPUT),
    as_json: bool = JsonOpt,
):
    """Several boards' runtime bench results in one table (and a plot with --out)."""
    from tinyprune.bench.boards import markdown, merge_files

    run(merge_files, files, out_dir, as_json=as_json,
        show=lambda t: out.print(markdown(t), markup=False, highlight=False, soft_wrap=True))


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
