"""`tinyprune sweep`: methods x targets, each point pruned from the dense pipeline, its UNet timed against the dense
one on onnxruntime CPU here and its samples scored on the digit yardstick against dense.

Targets are sparsities, or speed-ups for the structured methods (`--speedup`): a structured method then prunes to
each speed-up as `export --speedup` does, and the methods that only make zeros (magnitude, l1-grad, 2:4) run at the
sparsities and are timed like the others -- on a dense runtime their honest speed-up is about 1.0x. Writes
sweep.json, sweep.png (quality against sparsity) and pareto.png (measured speed-up against FD ratio and accuracy,
the points no other point beats drawn as the front).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tinyprune.config import PruneSpec, StructuredSpec, load_profile, parse_sparsity
from tinyprune.errors import InputError
from tinyprune.judge import gates as quality_gate
from tinyprune.judge.quality import NUM_DIGITS
from tinyprune.model.pipeline import demo_dir, load_pipeline
from tinyprune.prune.run import prune
from tinyprune.ship.bundle import check_out_dir, staged, write_json

DEFAULT_SPARSITIES = "0.2,0.3,0.43,0.5,0.6"
SPEEDUP_SWEEP_SPARSITY = "0.43"  # where the zero-making methods stand in a speed-up sweep: export's default


def _numbers(text: str, flag: str, parse) -> list[float]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise InputError(f"{flag} needs a comma-separated list, e.g. {'0.2,0.43,0.6' if flag == '--sparsity' else '1.5,2,3'}")
    return sorted({parse(p) for p in parts})


def parse_sparsities(text: str) -> list[float]:
    return _numbers(text, "--sparsity", parse_sparsity)


def parse_speedups(text: str) -> list[float]:
    return _numbers(text, "--speedup", lambda p: StructuredSpec.parse(speedup=p).speedup)


def parse_methods(text: str) -> list[str]:
    from tinyprune.config import METHODS

    methods = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    if not methods:
        raise InputError("--method needs a comma-separated list, e.g. magnitude,diff-pruning,ld-pruner")
    known = (*METHODS, "auto")
    for m in methods:
        if m not in known:
            raise InputError(f"unknown --method '{m}'; known methods: {', '.join(known)}")
    return methods


@dataclass(frozen=True)
class Point:
    """One pruning of the sweep: the spec and the target it was asked for."""

    spec: PruneSpec
    target: str  # "sparsity" | "speedup"
    value: float


def points(methods: list[str], sparsities: str | None, speedups: str | None, pattern: str, profile,
           scope: str = "global", calibration_samples: int | None = None) -> list[Point]:
    """Every (method, target) of the sweep, validated against the profile before any work."""
    from tinyprune.prune.structured.run import STRUCTURED_METHODS

    ups = parse_speedups(speedups) if speedups is not None else []
    levels = parse_sparsities(sparsities if sparsities is not None
                              else SPEEDUP_SWEEP_SPARSITY if ups else DEFAULT_SPARSITIES)
    out = []
    for method in methods:
        structured = method in STRUCTURED_METHODS
        # a structured method may not take --pattern 2:4: it is the zero-making methods' pattern
        pat = "unstructured" if structured and pattern == "2:4" else pattern
        if ups and structured:
            out += [Point(PruneSpec.resolve(method, 0.0, pat, scope, False, profile,
                                            structured=StructuredSpec.parse(speedup=x),
                                            calibration_samples=calibration_samples)[0], "speedup", x)
                    for x in ups]
        else:
            out += [Point(PruneSpec.resolve(method, s, pat, scope, False, profile,
                                            calibration_samples=calibration_samples)[0], "sparsity", s)
                    for s in levels]
    return out


def count(method: str, sparsities: str | None, speedups: str | None, pattern: str, target: str,
          calibration_samples: int | None = None) -> int:
    """How many points a sweep prunes (its progress bar's total)."""
    return len(points(parse_methods(method), sparsities, speedups, pattern, load_profile(target),
                      calibration_samples=calibration_samples))


class UnetClock:
    """The dense UNet exported once; each pruned UNet exported beside it and timed against it on onnxruntime CPU
    here, calls interleaved (batch 2, as a guided generation calls it). One lifecycle: `with UnetClock(...)`."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self) -> "UnetClock":
        import torch

        from tinyprune.prune.structured.cost import export_unet_onnx

        self._tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self._tmp.name)
        with torch.no_grad():
            self.cond = self.pipe.family.example_condition(1)
        self.feed = export_unet_onnx(self.pipe.unet, self.cond, self.dir / "dense.onnx")
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def speedup(self, unet) -> dict:
        from tinyprune.prune.structured.cost import export_unet_onnx, measured_speedup

        export_unet_onnx(unet, self.cond, self.dir / "pruned.onnx")
        return measured_speedup(self.dir / "dense.onnx", self.dir / "pruned.onnx", self.feed)


def pareto(rows: list[dict], quality: str, better: str) -> list[bool]:
    """Whether each row is on the front of measured speed-up (higher is better) and `quality` (`better`: "lower"
    or "higher"): no other row at least as fast and at least as good, and better in one of the two."""
    def q(r):
        return r[quality] if better == "higher" else -r[quality]

    return [not any(o["speedup"] >= r["speedup"] and q(o) >= q(r) and (o["speedup"] > r["speedup"] or q(o) > q(r))
                    for o in rows) for r in rows]


def sweep(model: str | None, sparsities: str | None = None, method: str = "magnitude",
          pattern: str = "unstructured", target: str = "jetson", out: str | Path = "sweep", force: bool = False,
          per_class: int = 20, seed: int = quality_gate.QUALITY_SEED, speedups: str | None = None,
          calibration_samples: int | None = None, log=lambda msg: None, progress=None) -> dict:
    """Dense samples once, calibration batches once per count; then for each point a fresh copy of the dense pipeline is
    pruned (a structured method's scores are computed once and reused across its targets: same model, same
    batches), timed against the dense UNet and sampled on the same prompts and noise (`seed` picks the noise)."""
    profile = load_profile(target)
    methods = parse_methods(method)
    todo = points(methods, sparsities, speedups, pattern, profile, calibration_samples=calibration_samples)
    if per_class < 1:
        raise InputError(f"--quality must be >= 1 sample per class for a sweep, got {per_class}")
    out = Path(out)
    check_out_dir(out, force)  # before minutes of sampling and pruning, not after (as export does)
    model_dir = Path(model) if model else demo_dir()
    dense = load_pipeline(model_dir)
    why_not = quality_gate.applies(dense)
    if why_not:
        raise InputError(f"sweep scores with the digit yardstick, which does not fit {model_dir}: {why_not}")
    log(f"dense samples ({per_class * NUM_DIGITS})")
    dense_q = quality_gate.draw(dense, per_class, seed=seed)
    calibrations = {}  # by count: by default the structured methods' distillation reads more latents than the others
    rows, scores = [], {}
    with UnetClock(dense) as clock:
        for p in todo:
            batches = None
            if p.spec.needs_calibration:
                from tinyprune.model.calibration import calibration_batches

                default = p.spec.default_calibration_samples
                key = calibration_samples or default
                if key not in calibrations:
                    calibrations[key] = calibration_batches(dense, None, seed=0, samples=calibration_samples,
                                                            default=default)
                batches = calibrations[key]
            pipe = copy.deepcopy(dense)
            t0 = time.perf_counter()
            plan = prune(pipe, p.spec, batches=batches, scores=scores.setdefault(p.spec.method, {}))
            prune_s = time.perf_counter() - t0
            speed = clock.speedup(pipe.unet)
            q = quality_gate.judge(dense_q, quality_gate.draw(pipe, per_class, seed=seed), profile)
            unet = plan.components["unet"]
            asked = getattr(unet, "target", {}).get("speedup") or {}
            rows.append({"method": p.spec.method, "pattern": p.spec.pattern, "target": p.target,
                         "sparsity": p.spec.sparsity if p.target == "sparsity" else round(unet.sparsity, 6),
                         "speedup_asked": p.value if p.target == "speedup" else None,
                         "achieved": round(unet.sparsity, 6),
                         "speedup": speed["speedup"], "p50_ms": speed["p50_ms"], "dense_p50_ms": speed["dense_p50_ms"],
                         "speedup_predicted": asked.get("predicted_speedup"),
                         "fd_ratio": q.fd_ratio, "fd": q.pruned_fd, "accuracy": q.pruned_accuracy,
                         "dense_fd": q.dense_fd, "dense_accuracy": q.dense_accuracy, "psnr_db": q.psnr_db,
                         "ssim": q.ssim, "prune_seconds": round(prune_s, 2), "gates_ok": bool(q)})
            log(f"{p.spec.method} at {p.target} {p.value:g}: UNet {speed['speedup']:.2f}x measured, FD ratio "
                f"{q.fd_ratio:.3f}, accuracy {q.pruned_accuracy:.3f}")
            del pipe
            if progress:
                progress()
    for flag, quality, better in (("pareto_fd", "fd_ratio", "lower"), ("pareto_accuracy", "accuracy", "higher")):
        for row, on in zip(rows, pareto(rows, quality, better)):
            row[flag] = on
    from tinyprune.judge.quality import pareto_plot, sweep_plot

    name = "demo" if model is None else model_dir.name
    result = {"model": name, "profile": profile.name, "method": ",".join(methods),
              "pattern": todo[0].spec.pattern if len(methods) == 1 else "per method", "n_samples": len(dense_q.labels),
              "seed": seed, "speed": {"backend": speed["backend"], "batch": 2, "threads": speed["threads"],
                                      "machine": speed["machine"]},
              "rows": rows}
    with staged(out, force) as tmp:
        write_json(tmp / "sweep.json", result)
        sweep_plot(rows, tmp / "sweep.png", title=f"{result['method']} on {name}")
        pareto_plot(rows, tmp / "pareto.png", title=f"{result['method']} on {name}, UNet timed on onnxruntime CPU here")
    return dict(result, out=str(out))
