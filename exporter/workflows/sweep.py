"""`tinyprune sweep`: one method at several sparsities, scored on the digit yardstick against dense."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from tinyprune.judge import gates as quality_gate
from tinyprune.judge.quality import NUM_DIGITS
from tinyprune.ship.bundle import check_out_dir, staged, write_json
from tinyprune.config import PruneSpec, load_profile, parse_sparsity
from tinyprune.errors import InputError
from tinyprune.model.pipeline import demo_dir, load_pipeline
from tinyprune.prune.run import prune


def parse_sparsities(text: str) -> list[float]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise InputError("--sparsity needs a comma-separated list, e.g. 0.2,0.43,0.6")
    return sorted({parse_sparsity(p) for p in parts})


def sweep(model: str | None, sparsities: str, method: str = "magnitude", pattern: str = "unstructured",
          target: str = "jetson", out: str | Path = "sweep", force: bool = False, per_class: int = 20,
          seed: int = quality_gate.QUALITY_SEED, log=lambda msg: None, progress=None) -> dict:
    """Dense samples once; then for each sparsity a fresh copy of the dense pipeline is pruned and sampled
    on the same labels and noise (`seed` picks the noise). Writes sweep.json and sweep.png into `out`."""
    profile = load_profile(target)
    levels = parse_sparsities(sparsities)
    specs = [PruneSpec.resolve(method, s, pattern, "global", False, profile)[0] for s in levels]
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
    rows = []
    for spec in specs:
        pipe = copy.deepcopy(dense)
        t0 = time.perf_counter()
        plan = prune(pipe, spec)
        prune_s = time.perf_counter() - t0
        q = quality_gate.judge(dense_q, quality_gate.draw(pipe, per_class, seed=seed), profile)
        rows.append({"method": spec.method, "pattern": spec.pattern, "sparsity": spec.sparsity,
                     "achieved": round(plan.components["unet"].sparsity, 6), "fd_ratio": q.fd_ratio,
                     "fd": q.pruned_fd, "accuracy": q.pruned_accuracy, "dense_fd": q.dense_fd,
                     "dense_accuracy": q.dense_accuracy, "psnr_db": q.psnr_db, "ssim": q.ssim,
                     "prune_seconds": round(prune_s, 2), "gates_ok": bool(q)})
        log(f"sparsity {spec.sparsity}: FD ratio {q.fd_ratio:.3f}, accuracy {q.pruned_accuracy:.3f}")
        if progress:
            progress()
    from tinyprune.judge.quality import sweep_plot

    result = {"model": "demo" if model is None else model_dir.name, "profile": profile.name, "method": method,
              "pattern": specs[0].pattern, "n_samples": len(dense_q.labels), "seed": seed, "rows": rows}
    with staged(out, force) as tmp:
        write_json(tmp / "sweep.json", result)
        sweep_plot(rows, tmp / "sweep.png", title=f"{method} ({specs[0].pattern}) on {result['model']}")
    return dict(result, out=str(out))
