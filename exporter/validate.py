"""Drift checks: ONNX (onnxruntime CPU) against PyTorch per component, and dense against pruned images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .compare import Drift, ImageDrift
from .components import COMPONENTS, ComponentSpec
from .config import DeviceProfile, ExportSpec
from .pipeline import Pipeline
from .runners import OrtRunner, TorchRunner

IMAGE_SEED = 0


def component_drift(pipe: Pipeline, comp: ComponentSpec, onnx_path: Path, spec: ExportSpec,
                    profile: DeviceProfile) -> list[Drift]:
    """Checked at the opt shape and at the smallest batch, so the dynamic batch axis is exercised too."""
    drifts = []
    torch_runner = TorchRunner(comp.module(pipe), comp.inputs, comp.outputs)
    with torch_runner, OrtRunner(onnx_path) as ort_runner:
        for batch in sorted({spec.batch.opt, spec.batch.min}):
            feed = comp.dummy_feed(pipe, batch, spec.latent.opt, seed=1)
            ref, got = torch_runner(feed), ort_runner(feed)
            for out in comp.outputs:
                drifts.append(Drift.of(f"{comp.name}.{out} (batch {batch})", ref[out], got[out], comp.tolerance(profile)))
    return drifts


def onnx_drift(pipe: Pipeline, bundle_dir: Path, spec: ExportSpec, profile: DeviceProfile) -> list[Drift]:
    return [d for comp in COMPONENTS for d in component_drift(pipe, comp, bundle_dir / comp.name / "model.onnx",
                                                              spec, profile)]


def torch_references(pipe: Pipeline, spec: ExportSpec, profile: DeviceProfile) -> list[tuple]:
    """PyTorch outputs for the drift feeds of every component, computed before any ONNX session exists.

    With these in hand the PyTorch model can be released before onnxruntime loads its own copy of the
    weights, so that no stage holds two (3.4 GB each at Stable Diffusion size).
    """
    refs = []
    for comp in COMPONENTS:
        with TorchRunner(comp.module(pipe), comp.inputs, comp.outputs) as torch_runner:
            for batch in sorted({spec.batch.opt, spec.batch.min}):
                feed = comp.dummy_feed(pipe, batch, spec.latent.opt, seed=1)
                refs.append((comp, batch, feed, torch_runner(feed), comp.tolerance(profile)))
    return refs


def ort_drift(refs: list[tuple], bundle_dir: Path) -> list[Drift]:
    """onnxruntime against the references of torch_references, one session at a time."""
    drifts = []
    for comp in COMPONENTS:
        mine = [r for r in refs if r[0] is comp]
        if not mine:
            continue
        with OrtRunner(bundle_dir / comp.name / "model.onnx") as ort_runner:
            for _, batch, feed, ref, tol in mine:
                got = ort_runner(feed)
                drifts += [Drift.of(f"{comp.name}.{out} (batch {batch})", ref[out], got[out], tol)
                           for out in comp.outputs]
    return drifts


def image_labels(pipe: Pipeline, n: int | None = None) -> list[int]:
    """The first n class labels (all when n is None)."""
    labels = list(range(pipe.conditioner.config.num_classes))
    return labels if n is None else labels[:n]


def image_latent_size(profile: DeviceProfile) -> int | None:
    """The image gate samples at the profile's opt latent size (the size the ONNX files are exported and checked
    at); None = the model's native size. A Stable-Diffusion-sized model decoded at 512 px costs more than 1 GB of
    activations on top of its weights; a profile with `latent = [min, opt, max]` keeps the gate at opt."""
    return profile.latent.opt if profile.latent else None


def reference_images(pipe: Pipeline, n: int | None = None, steps: int | None = None,
                     size: int | None = None) -> np.ndarray:
    """Final images for the check's seeds and labels: taken from the dense pipeline before it is pruned in place."""
    from .sampling import DEFAULT_STEPS, sample

    return sample(pipe, image_labels(pipe, n), seed=IMAGE_SEED, steps=steps or DEFAULT_STEPS, size=size).numpy()


def image_drift_against(ref: np.ndarray, pruned: Pipeline, profile: DeviceProfile, min_psnr_db: float | None = None,
                        n: int | None = None, steps: int | None = None) -> ImageDrift:
    """Dense reference images (reference_images) against the pruned pipeline's, same seeds, labels and noise."""
    got = reference_images(pruned, n, steps, image_latent_size(profile))
    gate = profile.min_image_psnr_db if min_psnr_db is None else min_psnr_db
    return ImageDrift.of("image dense vs pruned", ref, got, gate)


def skipped_image_drift(profile: DeviceProfile, min_psnr_db: float | None = None) -> dict:
    """What the report holds when --image-checks 0 skipped the dense-vs-pruned images: no gate applied."""
    gate = profile.min_image_psnr_db if min_psnr_db is None else min_psnr_db
    return {"name": "image dense vs pruned", "psnr_db": "skipped", "max_abs": None, "min_psnr_db": gate,
            "ok": True, "skipped": True}


def image_drift(dense: Pipeline, pruned: Pipeline, profile: DeviceProfile, min_psnr_db: float | None = None):
    """Final images of both pipelines for the same seeds, labels and initial noise; returns both image sets too."""
    a = reference_images(dense)
    b = reference_images(pruned)
    gate = profile.min_image_psnr_db if min_psnr_db is None else min_psnr_db
    return ImageDrift.of("image dense vs pruned", a, b, gate), a, b


def validate_bundle(bundle: Path, model: str | None = None, min_psnr_db: float | None = None,
                    log=lambda msg: None, image_checks: int | None = None, image_steps: int | None = None,
                    dense: str | Path | None = None, quality: int | None = None, max_fd_ratio: float | None = None,
                    min_accuracy: float | None = None) -> dict:
    """`tinyprune validate`: the export's drift checks again, on the bundle as it is on disk.

    dense: a dense bundle (same source, --sparsity 0) whose torch-free runtime is checked against the dense
    PyTorch pipeline too; the bundle's own runtime is always checked against the pruned pipeline."""
    from . import quality_gate, runtime_files
    from .bundle import read_manifest
    from .components import export_spec
    from .config import load_profile
    from .errors import GateFailed, InputError
    from .onnx_export import MAX_EXPORT_OPSET
    from .pipeline import demo_dir, load_pipeline, tree_sha256
    from .report import speedup_source

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    profile = load_profile(manifest["profile"])
    if model is None and manifest["source"]["model"] != "demo":
        raise InputError(f"{bundle} was not made from the demo pipeline: pass --model with the dense pipeline dir")
    model_dir = Path(model) if model else demo_dir()
    if tree_sha256(model_dir) != manifest["source"]["sha256"]:
        raise InputError(f"{model_dir} is not the pipeline {bundle} was made from (source sha256 differs)")
    if dense is not None:
        dense = runtime_files.check_dense_bundle(dense, manifest)
    # One pipeline in memory at a time: dense images first, then the pruned pipeline, then ONNX sessions.
    dense_pipe = load_pipeline(model_dir)
    if image_checks != 0:
        log("dense reference images")
        ref = reference_images(dense_pipe, image_checks, image_steps, image_latent_size(profile))
    why_not = quality_gate.why_skipped(dense_pipe, quality, is_demo=manifest["source"]["model"] == "demo")
    if not why_not:
        log("dense quality samples")
        dense_q = quality_gate.draw(dense_pipe, quality or quality_gate.DEFAULT_QUALITY_PER_CLASS)
    del dense_pipe
    log("loading the pruned pipeline")
    pruned = load_pipeline(bundle / "pruned")
    quality_result = None
    if not why_not:
        log("pruned quality samples")
        pruned_q = quality_gate.draw(pruned, len(dense_q.labels) // pruned.conditioner.config.num_classes)
        quality_result = quality_gate.judge(dense_q, pruned_q, profile, max_fd_ratio, min_accuracy)
    else:
        log(f"quality gates not applied: {why_not}")
    xspec = export_spec(pruned, profile, MAX_EXPORT_OPSET)
    if image_checks != 0:
        log("comparing dense and pruned images")
        img = image_drift_against(ref, pruned, profile, min_psnr_db, image_checks, image_steps)
        img_ok, img_dict = bool(img), img.to_dict()
    else:
        img_ok, img_dict = True, skipped_image_drift(profile, min_psnr_db)
    log("comparing ONNX with PyTorch")
    refs = torch_references(pruned, xspec, profile)
    runtime_refs = {"pruned": (bundle, None if image_checks == 0 else runtime_files.torch_e2e_reference(pruned, image_steps, image_checks))}
    del pruned
    if dense is not None:
        runtime_refs["dense"] = (dense, None if image_checks == 0 else
                                 runtime_files.torch_e2e_reference(load_pipeline(model_dir), image_steps, image_checks))
    drifts = ort_drift(refs, bundle)
    log("comparing the torch-free runtime's images with PyTorch's")
    runtime_drift = [runtime_files.runtime_check(b, ref, profile, what, image_steps)
                     for what, (b, ref) in runtime_refs.items()]
    plan = json.loads((bundle / "pruned" / "pruning_plan.json").read_text())
    ok = all(drifts) and img_ok and all(d["ok"] for d in runtime_drift) and (quality_result is None or bool(quality_result))
    result = {
        "bundle": str(bundle), "profile": profile.name, "method": manifest["method"], "pattern": manifest["pattern"],
        "requested_sparsity": manifest["sparsity"],
        "sparsity": {c: round(p["sparsity"], 6) for c, p in plan["components"].items()},
        "speedup_source": speedup_source(profile, manifest["pattern"]),
        "onnx_drift": [d.to_dict() for d in drifts], "image_drift": img_dict, "runtime_drift": runtime_drift,
        "quality": quality_result.to_dict() if quality_result is not None else None, "ok": ok,
    }
    if not ok:
        failed = [d.name for d in drifts if not d] + ([img_dict["name"]] if not img_ok else [])
        failed += [d["name"] for d in runtime_drift if not d["ok"]]
        failed += quality_result.failures() if quality_result is not None else []
        raise GateFailed(f"gate failed: {', '.join(failed)}", result)
    return result
