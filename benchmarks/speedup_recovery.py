"""What limits quality at `--speedup X` on the demo: the number of data-free calibration latents the recovery
distils on, its step budget, and the allocation's timed rounds. One structured pruning through the prune stage's own
functions (as `export --method M --speedup X --calibration-samples N --recovery-steps S` runs it), then the export's
FD / accuracy yardstick (100 samples, seed 1000) against dense; prints one JSON line.

    python benchmarks/speedup_recovery.py diff-pruning 34 300        # what export ran by default (34 latents)
    python benchmarks/speedup_recovery.py diff-pruning 200 2000 --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from tinyprune.config import L1GradSpec, PruneSpec, StructuredSpec, load_profile
from tinyprune.judge import gates
from tinyprune.model.calibration import from_samples
from tinyprune.model.pipeline import demo_dir, load_pipeline
from tinyprune.prune import recovery
from tinyprune.prune.structured import run as structured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("samples", type=int, help="data-free calibration latents (export's --calibration-samples)")
    ap.add_argument("steps", type=int, help="recovery steps (--recovery-steps)")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--sparsity", type=float, default=None,
                    help="a parameter target instead, allocated by parameters (no timing): the same units go "
                         "whatever the machine's load, to compare recoveries")
    ap.add_argument("--rounds", type=int, default=structured.MEASURE_ROUNDS, help="timed allocation rounds at most")
    ap.add_argument("--patience", type=int, default=recovery.PATIENCE, help="early stop: evaluations without a gain")
    args = ap.parse_args()
    structured.MEASURE_ROUNDS, recovery.PATIENCE = args.rounds, args.patience
    torch.set_num_threads(2)
    t0 = time.time()
    dense = load_pipeline(demo_dir())
    profile = load_profile("x86-cpu")
    n = None if args.samples == len(dense.family.calibration_conditions()) else args.samples
    batches = from_samples(dense, seed=0, n=n).batches(dense, 16, seed=0)
    dense_q = gates.draw(dense, 10)
    target = {"speedup": args.speedup} if args.sparsity is None else {"latency_aware": False}
    spec, _ = PruneSpec.resolve(args.method, args.sparsity or 0.0, "unstructured", "global", False, profile,
                                l1grad=L1GradSpec.parse(recovery_steps=args.steps),
                                structured=StructuredSpec.parse(**target))
    pipe = copy.deepcopy(dense)
    unet = structured.prune_structured(pipe, spec, batches, log=print).components["unet"]
    q = gates.judge(dense_q, gates.draw(pipe, 10), profile)
    speed = unet.target.get("speedup")
    print(json.dumps({"method": args.method, "calibration_latents": sum(len(b.t) for b in batches),
                      "recovery_steps": args.steps, "rounds": args.rounds, "patience": args.patience,
                      "params_removed": unet.params_removed,
                      "speedup_measured": speed["measured"]["speedup"] if speed else None,
                      "fd_ratio": round(q.fd_ratio, 3), "accuracy": q.pruned_accuracy, "dense_accuracy": q.dense_accuracy,
                      "recovery": {k: unet.recovery.get(k) for k in ("steps", "seconds", "loss_after")},
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
