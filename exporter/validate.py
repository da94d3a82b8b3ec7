"""Drift checks: ONNX (onnxruntime CPU) against PyTorch per component, and dense against pruned images."""

from __future__ import annotations

import json
from pathlib import Path

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


def image_labels(pipe: Pipeline) -> list[int]:
    return list(range(pipe.conditioner.config.num_classes))


def image_drift(dense: Pipeline, pruned: Pipeline, profile: DeviceProfile, min_psnr_db: float | None = None):
    """Final images of both pipelines for the same seeds, labels and initial noise; returns both image sets too."""
    from .sampling import sample

    labels = image_labels(dense)
    a = sample(dense, labels, seed=IMAGE_SEED).numpy()
    b = sample(pruned, labels, seed=IMAGE_SEED).numpy()
    gate = profile.min_image_psnr_db if min_psnr_db is None else min_psnr_db
    return ImageDrift.of("image dense vs pruned", a, b, gate), a, b


def validate_bundle(bundle: Path, model: str | None = None, min_psnr_db: float | None = None,
                    log=lambda msg: None) -> dict:
    """`tinyprune validate`: the export's drift checks again, on the bundle as it is on disk."""
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
    log("loading dense and pruned pipelines")
    dense, pruned = load_pipeline(model_dir), load_pipeline(bundle / "pruned")
    xspec = export_spec(pruned, profile, MAX_EXPORT_OPSET)
    log("comparing ONNX with PyTorch")
    drifts = onnx_drift(pruned, bundle, xspec, profile)
    log("comparing dense and pruned images")
    img, _, _ = image_drift(dense, pruned, profile, min_psnr_db)
    plan = json.loads((bundle / "pruned" / "pruning_plan.json").read_text())
    ok = all(drifts) and bool(img)
    result = {
        "bundle": str(bundle), "profile": profile.name, "method": manifest["method"], "pattern": manifest["pattern"],
        "requested_sparsity": manifest["sparsity"],
        "sparsity": {c: round(p["sparsity"], 6) for c, p in plan["components"].items()},
        "speedup_source": speedup_source(profile, manifest["pattern"]),
        "onnx_drift": [d.to_dict() for d in drifts], "image_drift": img.to_dict(), "ok": ok,
    }
    if not ok:
        failed = [d.name for d in drifts if not d] + ([img.name] if not img else [])
        raise GateFailed(f"drift over tolerance: {', '.join(failed)}", result)
    return result
