"""The headline command: prune -> bake -> ONNX per component -> validate drift -> atomic bundle."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from . import __version__
from .bundle import TIMINGS, check_out_dir, staged, write_json, write_manifest
from .components import COMPONENTS, export_spec
from . import quality_gate
from .config import L1GradSpec, PruneSpec, load_profile
from .errors import GateFailed, InputError
from .memory import peak_rss_mb, release_free_memory, reset_peak_rss
from .onnx_export import MAX_EXPORT_OPSET, export_component
from .quality_gate import DEFAULT_QUALITY_PER_CLASS
from .pipeline import demo_dir, load_pipeline, save_pipeline, tree_sha256
from .prune import prune
from .report import pruning_summary, speedup_source, write_report
from .runtime_files import prepare_runtime, runtime_check
from .validate import (image_drift_against, image_latent_size, ort_drift, reference_images, skipped_image_drift,
                       torch_references)


class Stages:
    """Line-oriented stage log with elapsed times and, on Linux, each stage's own peak RSS (the kernel's
    VmHWM, reset at the start of the stage); both end up in report/timings.json."""

    def __init__(self, log):
        self.log, self.times, self.peak_rss_mb = log, {}, {}

    def __call__(self, name: str):
        return _Stage(self, name)


class _Stage:
    def __init__(self, stages: Stages, name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        self.stages.log(f"{self.name} ...")
        release_free_memory()
        self.hwm = reset_peak_rss()
        self.t0 = time.perf_counter()

    def __exit__(self, exc_type, *_):
        dt = time.perf_counter() - self.t0
        self.stages.times[self.name] = round(dt, 3)
        peak = peak_rss_mb() if self.hwm else None
        if peak is not None:
            self.stages.peak_rss_mb[self.name] = peak
        if exc_type is None:
            self.stages.log(f"{self.name} done in {dt:.1f} s" + (f", peak RSS {peak / 1024:.2f} GB" if peak else ""))


def _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae, out: Path, force: bool, log,
                    before_prune=None, tuning: dict | None = None):
    """Load, then prune in place: one copy of the weights (no dense copy is kept; what needs the dense
    model, the reference images, runs in `before_prune` first)."""
    profile = load_profile(target)
    tuning = dict(tuning or {})  # raw CLI values of the l1-grad / recovery options, None = default
    calibration = tuning.pop("calibration", None)
    from .config import StructuredSpec

    structured = StructuredSpec.parse(**(tuning.pop("structured", None) or {}))  # structured methods' options
    spec, notices = PruneSpec.resolve(method, sparsity, pattern, scope, prune_vae, profile,
                                      l1grad=L1GradSpec.parse(**tuning), calibration=calibration,
                                      structured=structured)
    for n in notices:
        log(f"notice: {n}")
    check_out_dir(out, force)  # before minutes of work, not after
    model_dir = Path(model) if model else demo_dir()
    stage = Stages(log)
    with stage("load"):
        pipe = load_pipeline(model_dir)
        source_sha = tree_sha256(model_dir)
    before = before_prune(pipe, profile, stage) if before_prune else None
    with stage("prune"):
        plan = prune(pipe, spec, log=log)
    return profile, spec, notices, model_dir, pipe, plan, source_sha, stage, before


def prune_to_dir(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
                 scope: str = "global", prune_vae: bool = False, out: str | Path = "pruned", force: bool = False,
                 log=lambda msg: None, tuning: dict | None = None) -> dict:
    """Prune + bake only: a pipeline dir in diffusers layout plus pruning_plan.json."""
    out = Path(out)
    _, _, _, _, pruned, plan, _, _, _ = _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae,
                                                         out, force, log, tuning=tuning)
    with staged(out, force) as tmp:
        _save_pruned(pruned, plan, tmp)
    return {"out": str(out), "sparsity": {c: round(p["sparsity"], 6) for c, p in plan["components"].items()}}


def _save_pruned(pruned, plan: dict, root: Path) -> None:
    save_pipeline(pruned, root)
    write_json(root / "pruning_plan.json", plan)


def export(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
           scope: str = "global", prune_vae: bool = False, out: str | Path = "bundle", force: bool = False,
           min_psnr_db: float | None = None, log=lambda msg: None, image_checks: int | None = None,
           image_steps: int | None = None, tuning: dict | None = None, quality: int | None = None,
           max_fd_ratio: float | None = None, min_accuracy: float | None = None) -> dict:
    """The headline command. Memory: one copy of the weights at a time (load, dense reference images,
    prune in place, pruned images, save, ONNX export, PyTorch references; then the PyTorch pipeline is
    released before onnxruntime loads the ONNX files). image_checks: how many class labels the
    dense-vs-pruned image gate samples (None: all, 0: skip the gate); image_steps: sampler steps."""
    out = Path(out)
    if image_checks is not None and image_checks < 0:
        raise InputError(f"--image-checks must be >= 0, got {image_checks}")
    if image_steps is not None and image_steps < 1:
        raise InputError(f"--image-steps must be >= 1, got {image_steps}")

    if quality is not None and quality < 0:
        raise InputError(f"--quality must be >= 0 samples per class, got {quality}")

    def dense_images(pipe, profile, stage):
        refs = None
        if image_checks != 0:
            with stage("dense reference images"):
                refs = reference_images(pipe, image_checks, image_steps, image_latent_size(profile))
        why_not = quality_gate.why_skipped(pipe, quality, is_demo=model is None)
        if why_not:
            log(f"quality gates not applied: {why_not}")
            return refs, None
        with stage("dense quality samples"):
            return refs, quality_gate.draw(pipe, quality or DEFAULT_QUALITY_PER_CLASS)

    profile, spec, notices, model_dir, pruned, plan, source_sha, stage, (ref_images, dense_q) = _load_and_prune(
        model, sparsity, target, method, pattern, scope, prune_vae, out, force, log, before_prune=dense_images, tuning=tuning)
    quality_result = pruned_q = None
    if dense_q is not None:
        with stage("pruned quality samples"):
            pruned_q = quality_gate.draw(pruned, len(dense_q.labels) // pruned.conditioner.config.num_classes)
            quality_result = quality_gate.judge(dense_q, pruned_q, profile, max_fd_ratio, min_accuracy)
    if ref_images is None:
        img_ok, img_dict = True, skipped_image_drift(profile, min_psnr_db)
    else:
        with stage("validate dense vs pruned images"):
            img = image_drift_against(ref_images, pruned, profile, min_psnr_db, image_checks, image_steps)
        img_ok, img_dict = bool(img), img.to_dict()
    xspec = export_spec(pruned, profile, MAX_EXPORT_OPSET)
    meta = {"version": __version__, "method": spec.method, "pattern": spec.pattern, "profile": profile.name,
            "source_sha256": source_sha}
    with staged(out, force) as tmp:
        with stage("save pruned pipeline"):
            _save_pruned(pruned, plan, tmp / "pruned")
        components = {}
        for comp in COMPONENTS:
            with stage(f"export {comp.name}"):
                # a component the plan did not prune (the VAE by default) carries no pattern claim: verify
                # rejects "2:4" on a file without a single 2:4 tensor
                pattern = spec.pattern if comp.source in plan["components"] else "none"
                stamped = export_component(pruned, comp, xspec, tmp / comp.name / "model.onnx",
                                           dict(meta, pattern=pattern,
                                                params_dense=plan["components"].get(comp.source, {}).get("params_dense")))
            tensors = json.loads(stamped["tinyprune.tensors"])
            components[comp.name] = {
                "file": f"{comp.name}/model.onnx",
                "pattern": spec.pattern if comp.source in plan["components"] else "none",
                "tensors_2to4": sorted(n for n, t in tensors.items() if t["pattern"] == "2:4"),
                "inputs": comp.trt_shapes(pruned, xspec),
                "outputs": list(comp.outputs),
            }
        with stage("pytorch references"):
            refs = torch_references(pruned, xspec, profile)
        with stage("runtime files"):  # runtime/ for the torch-free loop, and PyTorch images to check it against
            runtime_ref = prepare_runtime(pruned, tmp, image_checks, image_steps)
        del pruned  # the last reference to the PyTorch weights: onnxruntime's copy must not sit beside them
        gc.collect()
        with stage("validate onnx drift"):
            drifts = ort_drift(refs, tmp)
        with stage("validate runtime vs pytorch images"):
            runtime_drift = runtime_check(tmp, runtime_ref, profile, "pruned", image_steps)
        if quality_result is not None:
            quality_gate.write_grid(dense_q, pruned_q, tmp / "report" / "grid.png")
        ok = all(drifts) and img_ok and runtime_drift["ok"] and (quality_result is None or bool(quality_result))
        report = {
            "model": "demo" if model is None else model_dir.name,
            "profile": profile.name,
            "method": spec.method,
            "pattern": spec.pattern,
            "requested_sparsity": spec.sparsity,
            "sparsity": {c: round(p["sparsity"], 6) for c, p in plan["components"].items()},
            "speedup_source": speedup_source(profile, spec.pattern),
            "notices": notices,
            "onnx_drift": [d.to_dict() for d in drifts],
            "image_drift": img_dict,
            "runtime_drift": [runtime_drift],
            "pruning": pruning_summary(plan),
            "quality": quality_result.to_dict() if quality_result is not None else None,
            "opset": xspec.opset,
            "ok": ok,
        }
        write_report(tmp, report)
        manifest = write_manifest(tmp, {
            "format": 1, "tool": "tinyprune", "version": __version__, "profile": profile.name,
            "method": spec.method, "pattern": spec.pattern, "scope": spec.scope, "sparsity": spec.sparsity,
            "source": {"model": report["model"], "sha256": source_sha}, "opset": xspec.opset,
            "components": components,
        })
        write_json(tmp / TIMINGS, {"seconds": stage.times, "peak_rss_mb": stage.peak_rss_mb})
    result = dict(report, bundle=str(out), files=len(manifest["files"]), timings=stage.times,
                  peak_rss_mb=stage.peak_rss_mb)
    if not ok:
        failed = [d.name for d in drifts if not d] + ([img_dict["name"]] if not img_ok else [])
        failed += [runtime_drift["name"]] if not runtime_drift["ok"] else []
        failed += quality_result.failures() if quality_result is not None else []
        raise GateFailed(f"gate failed: {', '.join(failed)} (bundle written to {out}; see report/report.md)", result)
    return result
