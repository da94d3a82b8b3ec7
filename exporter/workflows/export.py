"""The headline command: prune -> bake -> ONNX per component -> validate drift -> atomic bundle."""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from tinyprune import __version__
from tinyprune.ship.bundle import TIMINGS, check_out_dir, staged, write_json, write_manifest
from tinyprune.export.specs import component_config, component_specs, export_spec
from tinyprune.config import ComputeSpec, DeviceProfile, L1GradSpec, PruneSpec, load_profile
from tinyprune.errors import GateFailed, InputError
from tinyprune.runtime.measure import peak_rss_mb, release_free_memory, reset_peak_rss
from tinyprune.export.trt_parser import TORCH_EMITS_FROM, parser_opset, unparseable
from tinyprune.export.metadata import read_metadata
from tinyprune.export.writer import MAX_EXPORT_OPSET, export_component, load_onnx
from tinyprune.judge.checks import Checked, CheckOptions, Checks, QualityCheck
from tinyprune.model.pipeline import demo_dir, load_pipeline, save_pipeline, tree_sha256
from tinyprune.prune.distributed import Engine, launched, local, session
from tinyprune.prune.plan import PrunePlan
from tinyprune.prune.run import prune
from tinyprune.ship.report import pruning_summary, speedup_source, write_report
from tinyprune.ship.runtime_files import write_runtime_dir
from tinyprune.ship.tensorrt import write_build_script


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
            self.stages.log(f"{self.name} done in {dt:.1f} s" + (f", peak RSS {peak / 1024:.2f} GiB" if peak else ""))


@dataclass(frozen=True)
class PruneRun:
    """What _load_and_prune did. The pruned pipeline comes beside it, not in it: the caller holds the only
    reference to the weights, and releases it before onnxruntime loads its own copy."""

    profile: DeviceProfile
    spec: PruneSpec
    notices: tuple[str, ...]
    model_dir: Path
    plan: PrunePlan
    source_sha: str
    stage: Stages
    checks: Checks | None  # fed the dense pipeline before it was pruned


def _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae, out: Path, force: bool, log,
                    checks: Callable[[DeviceProfile, Stages], Checks] | None = None, tuning: dict | None = None,
                    engine: Engine | None = None):
    """Load, then prune in place: one copy of the weights (no dense copy is kept; what needs the dense
    model, the checks' dense phase, runs first). Returns (PruneRun, the pruned pipeline). `engine`: where the prune
    stage computes (prune_to_dir's session); None: one process, on tuning["compute"]'s device."""
    if engine is None and launched():  # every rank would run the whole export and write the same --out
        raise InputError("under accelerate launch / torchrun only `tinyprune prune` runs (data-parallel); export "
                         "its output in one process: tinyprune export --model PRUNED_DIR --sparsity 0")
    profile = load_profile(target)
    tuning = dict(tuning or {})  # raw CLI values of the l1-grad / recovery options, None = default
    compute = ComputeSpec.parse(**(tuning.pop("compute", None) or {}))
    engine = engine or local(compute)
    calibration = tuning.pop("calibration", None)
    calibration_samples = tuning.pop("calibration_samples", None)
    prune_text = bool(tuning.pop("prune_text_encoder", False))
    from tinyprune.config import StructuredSpec

    structured = StructuredSpec.parse(**(tuning.pop("structured", None) or {}))  # structured methods' options
    spec, notices = PruneSpec.resolve(method, sparsity, pattern, scope, prune_vae, profile,
                                      l1grad=L1GradSpec.parse(**tuning), calibration=calibration,
                                      structured=structured, prune_text_encoder=prune_text,
                                      calibration_samples=calibration_samples)
    for n in notices:
        log(f"notice: {n}")
    engine.on_main(lambda: check_out_dir(out, force))  # before minutes of work, not after; rank 0 cleans up
    model_dir = Path(model) if model else demo_dir()
    stage = Stages(log)
    with stage("load"):
        pipe = load_pipeline(model_dir)
        source_sha = tree_sha256(model_dir)
    run_checks = checks(profile, stage, pipe) if checks else None
    if run_checks is not None:
        run_checks.dense(pipe)
    with stage("prune"):
        plan = prune(pipe, spec, log=log, engine=engine)
    return PruneRun(profile, spec, tuple(notices), model_dir, plan, source_sha, stage, run_checks), pipe


def prune_to_dir(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
                 scope: str = "global", prune_vae: bool = False, out: str | Path = "pruned", force: bool = False,
                 log=lambda msg: None, tuning: dict | None = None) -> dict:
    """Prune + bake only: a pipeline dir in diffusers layout plus pruning_plan.json. Under accelerate launch or
    torchrun every rank prunes its share (prune/distributed.py) and only rank 0 logs and writes."""
    out = Path(out)
    tuning = dict(tuning or {})
    with session(ComputeSpec.parse(**(tuning.pop("compute", None) or {}))) as engine:
        run, pruned = _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae, out, force,
                                      log if engine.main else (lambda msg: None), tuning=tuning, engine=engine)
        if engine.main:
            with staged(out, force) as tmp:
                _save_pruned(pruned, run.plan, tmp)
    return {"out": str(out), "sparsity": run.plan.sparsity(), "processes": engine.world}


def _save_pruned(pruned, plan: PrunePlan, root: Path) -> None:
    save_pipeline(pruned, root)
    write_json(root / "pruning_plan.json", plan.to_dict())


@dataclass(frozen=True)
class ExportResult:
    """What `tinyprune export` made; truthy when every gate passed. report(): report/report.json;
    to_dict(): the --json output (the report plus where the bundle is and what the run cost)."""

    model: str
    profile: str
    method: str
    pattern: str
    requested_sparsity: float
    sparsity: Mapping[str, float]  # per pruned component
    speedup_source: str
    notices: tuple[str, ...]
    pruning: dict  # ship/report.pruning_summary of the plan
    opset: int
    precision: dict  # export/precision.py PrecisionResult.to_dict(), plus any notice
    checked: Checked
    bundle: Path
    files: int = 0  # files in the manifest
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    peak_rss_mb: Mapping[str, float] = field(default_factory=dict)  # per stage, where the kernel tells

    def __bool__(self) -> bool:
        return bool(self.checked)

    def report(self) -> dict:
        return {"model": self.model, "profile": self.profile, "method": self.method, "pattern": self.pattern,
                "requested_sparsity": self.requested_sparsity, "sparsity": dict(self.sparsity),
                "speedup_source": self.speedup_source, "notices": list(self.notices), "pruning": self.pruning,
                "opset": self.opset, "precision": self.precision, **self.checked.to_dict()}

    def to_dict(self) -> dict:
        return dict(self.report(), bundle=str(self.bundle), files=self.files, timings=dict(self.timings),
                    peak_rss_mb=dict(self.peak_rss_mb))


def export(model: str | None, sparsity, target: str, method: str = "magnitude", pattern: str = "unstructured",
           scope: str = "global", prune_vae: bool = False, out: str | Path = "bundle", force: bool = False,
           min_psnr_db: float | None = None, log=lambda msg: None, image_checks: int | None = None,
           image_steps: int | None = None, tuning: dict | None = None, quality: int | None = None,
           max_fd_ratio: float | None = None, min_accuracy: float | None = None,
           precision: str | None = None) -> ExportResult:
    """The headline command. Memory: one copy of the weights at a time (load, the checks' dense side,
    prune in place, the checks' PyTorch side, save, ONNX export; then the PyTorch pipeline is released
    before onnxruntime loads the ONNX files and the checks compare them: judge/checks.py). image_checks: how
    many class labels the dense-vs-pruned image gate samples (None: all, 0: skip the gate); image_steps:
    sampler steps. precision: fp32 (default) | fp16 | int8 | auto (export/precision.py)."""
    from tinyprune.export import precision as precisions

    out = Path(out)
    if precision not in (None, "auto"):  # a precision the target cannot run: exit 2 before any work
        precisions.resolve(precision, load_profile(target), 0)
    if image_checks is not None and image_checks < 0:
        raise InputError(f"--image-checks must be >= 0, got {image_checks}")
    if image_steps is not None and image_steps < 1:
        raise InputError(f"--image-steps must be >= 1, got {image_steps}")

    if quality is not None and quality < 0:
        raise InputError(f"--quality must be >= 0 samples per class, got {quality}")

    chosen = {}

    def checks(profile, stage, pipe):  # after load: auto needs the UNet's size; the gates follow the precision
        choice = chosen["choice"] = precisions.resolve(precision, profile, pipe.unet_params)
        options = CheckOptions(profile.for_precision(choice.precision), min_psnr_db, image_checks, image_steps,
                               quality, max_fd_ratio, min_accuracy, is_demo=model is None,
                               precision=choice.precision).for_pipeline(pipe)
        if options.scaled:
            log(f"notice: {options.scaled}")
        chosen["scaled"] = options.scaled
        return Checks(options, log=log, stage=stage)

    run, pruned = _load_and_prune(model, sparsity, target, method, pattern, scope, prune_vae, out, force, log,
                                  checks=checks, tuning=tuning)
    profile, spec, plan, stage = run.profile, run.spec, run.plan, run.stage
    choice = chosen["choice"]
    run.checks.pruned(pruned)  # PyTorch's side of every check, while the pipeline is loaded
    xspec = export_spec(pruned, profile, MAX_EXPORT_OPSET)
    notices = run.notices + tuple(n for n in (chosen["scaled"], choice.notice) if n)
    if choice.notice:
        log(f"notice: {choice.notice}")
    lowered = parser_opset(profile, MAX_EXPORT_OPSET)
    if lowered.lowered:
        why = (f"cannot parse {', '.join(lowered.avoided)}, which torch emits from opset "
               f"{min(TORCH_EMITS_FROM[op] for op in lowered.avoided)} on (decomposed below it)" if lowered.avoided
               else f"takes opsets up to {lowered.opset}")
        notices += (f"{profile.name}: exported at opset {lowered.opset}, not {lowered.ceiling}: TensorRT "
                    f"{profile.trt_version}'s ONNX parser {why}",)
        log(f"notice: {notices[-1]}")
    if xspec.opset < 14 and any(c.name.startswith("text_encoder") for c in component_specs(pruned)):
        notices += (f"{profile.name}: text encoders exported at opset {xspec.opset} with eager attention "
                    "(MatMul/Softmax): CLIP's fused attention needs opset 14, which this target's TensorRT does not parse",)
        log(f"notice: {notices[-1]}")
    meta = {"version": __version__, "method": spec.method, "pattern": spec.pattern, "profile": profile.name,
            "source_sha256": run.source_sha}
    calibration_conditions = pruned.family.calibration_conditions()[:precisions.CALIBRATION_CONDITIONS]
    with staged(out, force) as tmp:
        with stage("save pruned pipeline"):
            _save_pruned(pruned, plan, tmp / "pruned")
            for name in ("scheduler", *pruned.family.tokenizers()):  # beside the ONNX files, as the pipeline has them
                shutil.copytree(tmp / "pruned" / name, tmp / name)
        # From here on the pipeline is the one just saved, mapped from pruned/ and loaded again for each component:
        # only the weights of the component being exported become resident, not the whole pipeline's beside it
        # (SD-1.5: the text encoder exported beside the whole pipeline peaked at 1.86x the UNet's weights).
        del pruned
        gc.collect()
        saved = load_pipeline(tmp / "pruned")  # its weights stay unread: configs, scheduler, tokenizers
        specs = component_specs(saved)  # the family's closures hold their pipeline: not the released one's
        components = {}
        for comp in specs:
            pruned_comp = plan.components.get(comp.source)
            with stage(f"export {comp.name}"):
                # a component the plan did not prune (the VAE by default) carries no pattern claim: verify
                # rejects "2:4" on a file without a single 2:4 tensor
                pattern = spec.pattern if pruned_comp is not None else "none"
                export_component(load_pipeline(tmp / "pruned"), comp, xspec, tmp / comp.name / "model.onnx",
                                 dict(meta, pattern=pattern,
                                      params_dense=pruned_comp.dense_params() if pruned_comp else None))
            refused = unparseable(tmp / comp.name / "model.onnx", profile, file=f"{comp.name}/model.onnx")
            if refused:  # one line, exit 2; staged() removes the half bundle and leaves --out as it was
                more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
                raise InputError(f"{refused[0]}{more}; nothing was written to {out}")
            write_json(tmp / comp.name / "config.json", component_config(saved, comp.source))
            components[comp.name] = {
                "file": f"{comp.name}/model.onnx",
                "pattern": pattern,
                "inputs": comp.trt_shapes(xspec),
                "outputs": list(comp.outputs),
            }
        index = saved.family.onnx_index()
        if index is not None:  # what diffusers' and optimum's ONNX pipelines load the bundle by
            write_json(tmp / "model_index.json", index)
        with stage("runtime files"):  # runtime/ for the torch-free loop
            write_runtime_dir(saved, tmp)
        del saved  # the last mapping of the PyTorch weights: onnxruntime's copy must not sit beside them
        gc.collect()
        with stage("precision"):
            converted = precisions.apply(tmp, choice.precision, specs, profile, xspec.work_latent,
                                         calibration_conditions, xspec.external_data_threshold, log=log)
        for name, comp in components.items():  # from the files as they now are (int8 renames the weights)
            claims = read_metadata(load_onnx(tmp / comp["file"], load_data=False))
            comp["precision"] = claims["tinyprune.precision"]
            comp["tensors_2to4"] = sorted(n for n, t in json.loads(claims["tinyprune.tensors"]).items()
                                          if t["pattern"] == "2:4")
        if profile.has_tensorrt:  # the on-device engine build, covered by the manifest's checksums like the rest;
            # from the components as manifest.json holds them (sorted keys), so `tinyprune build` writes the same bytes
            write_build_script(tmp, json.loads(json.dumps({"components": components}, sort_keys=True)), profile)
        run.checks.bundle(tmp)
        run.checks.get(QualityCheck).write_grid(tmp / "report" / "grid.png")
        result = ExportResult(
            model="demo" if model is None else run.model_dir.name, profile=profile.name, method=spec.method,
            pattern=spec.pattern, requested_sparsity=spec.sparsity, sparsity=plan.sparsity(),
            speedup_source=speedup_source(profile, spec.pattern, choice.precision), notices=notices,
            pruning=pruning_summary(plan), opset=xspec.opset, precision=converted.to_dict(),
            checked=run.checks.done(), bundle=out)
        write_report(tmp, result.report())
        manifest = write_manifest(tmp, {
            "format": 1, "tool": "tinyprune", "version": __version__, "profile": profile.name,
            "method": spec.method, "pattern": spec.pattern, "scope": spec.scope, "sparsity": spec.sparsity,
            "source": {"model": result.model, "sha256": run.source_sha}, "opset": xspec.opset,
            "precision": choice.precision,
            "components": components,
        })
        write_json(tmp / TIMINGS, {"seconds": stage.times, "peak_rss_mb": stage.peak_rss_mb})
    result = replace(result, files=len(manifest["files"]), timings=stage.times, peak_rss_mb=stage.peak_rss_mb)
    if not result:
        raise GateFailed(result.checked.verdict.message(f" (bundle written to {out}; see report/report.md)"),
                         result.to_dict())
    return result
