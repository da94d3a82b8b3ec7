"""The 2:4 layer ranking as large UNets get it, against the full one, on pipelines small enough for both.

A UNet past export.specs.CHECK_WORK (SD-1.5 and up) ranks its eligible layers by measured sensitivity on
calibration.LARGE_MODEL_CALIBRATION data-free latents made at the work latent (SD-1.5: 8 latents at 16 instead of 40
at 64); smaller UNets get their family's calibration set at native size. This script ranks the same layers both ways
and prints the Spearman correlation of the sensitivities, the overlap of the layers each picks at the sparsity, and
the time each took:

  - the demo (native latent 8, the smallest a ranking takes): the sample count alone (8 latents against 34)
  - the tests' tiny SD pipeline of the families (native 16): the latent (8 against 16) and the sample count

    .venv/bin/python benchmarks/two_four_ranking.py [--sparsity 0.43]

Results: benchmarks/results/two_four_ranking.md (with the command).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny pipelines

from tinyprune.model.calibration import LARGE_MODEL_CALIBRATION, from_samples  # noqa: E402
from tinyprune.model.pipeline import demo_dir, load_pipeline  # noqa: E402
from tinyprune.prune import two_four  # noqa: E402
from tinyprune.prune.importance import SCORES  # noqa: E402
from tinyprune.prune.masks import prunable_weights  # noqa: E402


def ranking(pipe, samples: int | None, size: int | None, sparsity: float):
    """Sensitivities of the eligible layers and the layers picked at `sparsity`, with the seconds it took."""
    t0 = time.perf_counter()
    batches = from_samples(pipe, seed=0, n=samples, size=size).batches(pipe, 16, seed=0)
    weights = prunable_weights(pipe.unet)
    masks, decisions = two_four.select(pipe.unet, weights, SCORES["magnitude"](weights), sparsity, batches)
    sens = {n: d["sensitivity"] for n, d in decisions.items() if "sensitivity" in d}
    return sens, set(masks), time.perf_counter() - t0, sum(len(b.t) for b in batches)


def spearman(a: dict, b: dict) -> float:
    names = sorted(a)
    ra = np.argsort(np.argsort([a[n] for n in names]))
    rb = np.argsort(np.argsort([b[n] for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.43)
    args = ap.parse_args()
    torch.manual_seed(0)
    from pipelines import save

    with tempfile.TemporaryDirectory() as tmp:
        cases = [("demo", demo_dir(), 8), ("tests' tiny SD (latent 16)", save("sd", Path(tmp) / "sd"), 8)]
        print(f"| pipeline | full: latents x size | large-UNet: latents x size | Spearman | picked both / full | "
              f"full s | large-UNet s |\n|---|---|---|---|---|---|---|")
        for name, path, small in cases:
            pipe = load_pipeline(path)
            full, full_pick, full_s, full_n = ranking(pipe, None, None, args.sparsity)
            prox, prox_pick, prox_s, prox_n = ranking(pipe, LARGE_MODEL_CALIBRATION, small, args.sparsity)
            print(f"| {name} | {full_n} x {pipe.latent_size} | {prox_n} x {small} | {spearman(full, prox):.3f} | "
                  f"{len(full_pick & prox_pick)} / {len(full_pick)} | {full_s:.1f} | {prox_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
