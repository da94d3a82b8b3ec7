"""The headline command: prune -> bake -> ONNX per component -> validate drift -> atomic bundle."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from . import __version__
from .bundle import TIMINGS, check_out_dir, staged, write_json, write_manifest
from .components import COMPONENTS, export_spec
from .config import L1GradSpec, PruneSpec, load_profile
from .errors import GateFailed
from .onnx_export import MAX_EXPORT_OPSET, export_component
from .pipeline import demo_dir, load_pipeline, save_pipeline, tree_sha256
from .prune import prune
from .report import pruning_summary, speedup_source, write_report
from .validate import image_drift, onnx_drift


class Stages:
    """Line-oriented stage log with elapsed times; the times end up in report/timings.json."""

    def __init__(self, log):
        self.log, self.times = log, {}

    def __call__(self, name: str):
        return _Stage(self, name)


class _Stage:
    def __init__(self, stages: Stages, name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        self.stages.log(f"{self.name} ...")
        self.t0 = time.perf_counter()

    def __exit__(self, exc_type, *_):
        dt = time.perf_counter() - self.t0
        self.stages.times[self.name] = round(dt, 3)
        if exc_type is None:
            self.stages.log(f"{self.name} done in {dt:.1f} s")


def _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae, out: Path, force: bool, log,
                    tuning: dict | None = None):
    profile = load_profile(target)
    tuning = dict(tuning or {})  # raw CLI values of the l1-grad / recovery options, None = default
    calibration = tuning.pop("calibration", None)
    spec, notices = PruneSpec.resolve(method, sparsity, pattern, scope, prune_vae, profile,
                                      l1grad=L1GradSpec.parse(**tuning), calibration=calibration)
    for n in notices:
        log(f"notice: {n}")
    check_out_dir(out, force)  # before minutes of work, not after
    model_dir = Path(model) if model else demo_dir()
    stage = Stages(log)
    with stage("load"):
        dense = load_pipeline(model_dir)
        source_sha = tree_sha256(model_dir)
        pruned = copy.deepcopy(dense)
    with stage("prune"):
        plan = prune(pruned, spec, log=log)
    return profile, spec, notices, model_dir, dense, pruned, plan, source_sha, stage


def prune_to_dir(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
                 scope: str = "global", prune_vae: bool = False, out: str | Path = "pruned", force: bool = False,
                 log=lambda msg: None, tuning: dict | None = None) -> dict:
    """Prune + bake only: a pipeline dir in diffusers layout plus pruning_plan.json."""
    out = Path(out)
    _, _, _, _, _, pruned, plan, _, _ = _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae,
                                                         out, force, log, tuning=tuning)
    with staged(out, force) as tmp:
        _save_pruned(pruned, plan, tmp)
    return {"out": str(out), "sparsity": {c: round(p["sparsity"], 6) for c, p in plan["components"].items()}}


def _save_pruned(pruned, plan: dict, root: Path) -> None:
    save_pipeline(pruned, root)
    write_json(root / "pruning_plan.json", plan)


def export(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
           scope: str = "global", prune_vae: bool = False, out: str | Path = "bundle", force: bool = False,
           min_psnr_db: float | None = None, log=lambda msg: None, tuning: dict | None = None) -> dict:
    out = Path(out)
    profile, spec, notices, model_dir, dense, pruned, plan, source_sha, stage = _load_and_prune(
        model, sparsity, target, method, pattern, scope, prune_vae, out, force, log, tuning=tuning)
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
                                           dict(meta, pattern=pattern))
            tensors = json.loads(stamped["tinyprune.tensors"])
            components[comp.name] = {
                "file": f"{comp.name}/model.onnx",
                "pattern": spec.pattern if comp.source in plan["components"] else "none",
                "tensors_2to4": sorted(n for n, t in tensors.items() if t["pattern"] == "2:4"),
                "inputs": comp.trt_shapes(pruned, xspec),
                "outputs": list(comp.outputs),
            }
        with stage("validate onnx drift"):
            drifts = onnx_drift(pruned, tmp, xspec, profile)
        with stage("validate dense vs pruned images"):
            img, _, _ = image_drift(dense, pruned, profile, min_psnr_db)
        ok = all(drifts) and bool(img)
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
            "image_drift": img.to_dict(),
            "pruning": pruning_summary(plan),
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
        write_json(tmp / TIMINGS, stage.times)
    result = dict(report, bundle=str(out), files=len(manifest["files"]), timings=stage.times)
    if not ok:
        failed = [d.name for d in drifts if not d] + ([img.name] if not img else [])
        raise GateFailed(f"drift over tolerance: {', '.join(failed)} (bundle written to {out}; see report/report.md)",
                         result)
    return result
