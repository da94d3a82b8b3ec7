"""`tinyprune validate`: the export's checks (judge/checks.py) again, on the bundle as it is on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tinyprune.errors import InputError
from tinyprune.judge.checks import Checked, CheckOptions, Checks
from tinyprune.ship.bundle import read_manifest
# benchmarks/sd15_scale.py times the image gate's sampling through these names


@dataclass(frozen=True)
class ValidateResult:
    """What `tinyprune validate` found; truthy when every gate passed. to_dict(): the --json output."""

    bundle: Path
    profile: str
    method: str
    pattern: str
    requested_sparsity: float
    sparsity: Mapping[str, float]  # per pruned component, from the bundle's pruning plan
    speedup_source: str
    checked: Checked

    def __bool__(self) -> bool:
        return bool(self.checked)

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "profile": self.profile, "method": self.method, "pattern": self.pattern,
                "requested_sparsity": self.requested_sparsity, "sparsity": dict(self.sparsity),
                "speedup_source": self.speedup_source, **self.checked.to_dict()}


def validate_bundle(bundle: Path, model: str | None = None, min_psnr_db: float | None = None,
                    log=lambda msg: None, image_checks: int | None = None, image_steps: int | None = None,
                    dense: str | Path | None = None, quality: int | None = None, max_fd_ratio: float | None = None,
                    min_accuracy: float | None = None) -> ValidateResult:
    """`tinyprune validate`: the export's checks again, on the bundle as it is on disk.

    dense: a dense bundle (same source, --sparsity 0) whose torch-free runtime is checked against the dense
    PyTorch pipeline too; the bundle's own runtime is always checked against the pruned pipeline."""
    from tinyprune.config import load_profile
    from tinyprune.errors import GateFailed
    from tinyprune.model.pipeline import demo_dir, load_pipeline, tree_sha256
    from tinyprune.prune.plan import PrunePlan
    from tinyprune.ship.report import speedup_source

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    profile = load_profile(manifest["profile"])
    if model is None and manifest["source"]["model"] != "demo":
        raise InputError(f"{bundle} was not made from the demo pipeline: pass --model with the dense pipeline dir")
    model_dir = Path(model) if model else demo_dir()
    if tree_sha256(model_dir) != manifest["source"]["sha256"]:
        raise InputError(f"{model_dir} is not the pipeline {bundle} was made from (source sha256 differs)")
    if dense is not None:
        dense = check_dense_bundle(dense, manifest)
    precision = manifest.get("precision", "fp32")  # bundles before precisions were fp32
    # One pipeline in memory at a time: the dense one, then the pruned one, then ONNX sessions.
    dense_pipe = load_pipeline(model_dir)
    options = CheckOptions(profile.for_precision(precision), min_psnr_db, image_checks, image_steps, quality,
                           max_fd_ratio, min_accuracy, is_demo=manifest["source"]["model"] == "demo",
                           dense_bundle=dense, precision=precision).for_pipeline(dense_pipe)
    if options.scaled:
        log(f"notice: {options.scaled}")
    checks = Checks(options, log=log)
    checks.dense(dense_pipe)
    del dense_pipe
    log("loading the pruned pipeline")
    pruned = load_pipeline(bundle / "pruned")
    checks.pruned(pruned)
    del pruned
    checks.bundle(bundle)
    plan = PrunePlan.from_dict(json.loads((bundle / "pruned" / "pruning_plan.json").read_text()))
    result = ValidateResult(bundle, profile.name, manifest["method"], manifest["pattern"], manifest["sparsity"],
                            plan.sparsity(), speedup_source(profile, manifest["pattern"], precision), checks.done())
    if not result:
        raise GateFailed(result.checked.verdict.message(), result.to_dict())
    return result


def check_dense_bundle(dense: str | Path, manifest: dict) -> Path:
    """validate --dense: a bundle of the same source pipeline exported with sparsity 0."""
    dense = Path(dense)
    dm = read_manifest(dense)
    if dm.get("source", {}).get("sha256") != manifest["source"]["sha256"]:
        raise InputError(f"--dense {dense} was not made from the same source pipeline as the bundle")
    if dm.get("sparsity") not in (0, 0.0):
        raise InputError(f"--dense {dense} is not a dense bundle (sparsity {dm.get('sparsity')}); export one with "
                         "--sparsity 0")
    return dense
