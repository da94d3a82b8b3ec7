"""Prune the tiny pipeline with every method on this process's engine and save what each decided (rank 0 only).

    python tests/distributed_plans.py OUT                                    one process
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_plans.py OUT    two ranks (gloo)

tests/test_distributed.py runs both and compares OUT/plans.safetensors (every case's pruned UNet weights, so
masks, kept units and recovered weights alike) and OUT/plans.json (the plans and the structured unit scores).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from pipelines import tiny  # noqa: E402

from tinyprune.config import ComputeSpec, L1GradSpec, PruneSpec, load_profile  # noqa: E402
from tinyprune.model.calibration import CalibrationSet  # noqa: E402
from tinyprune.prune.distributed import session  # noqa: E402
from tinyprune.prune.run import prune  # noqa: E402
from tinyprune.prune.structured.run import prune_structured  # noqa: E402

# (method, pattern, target, l1-grad/recovery options, structured score options): the smallest settings that still
# run every distributed code path: sharded gradient sums, DDP recovery, Taylor's per-timestep all-reduce, LD-Pruner's
# chunks, EcoDiff's split trajectories, distillation
CASES = {
    "magnitude": ("magnitude", "unstructured", "x86-cpu", {"recovery_steps": 3}, None),
    "l1-grad": ("l1-grad", "unstructured", "x86-cpu", {"iterations": 2, "recovery_steps": 4}, None),
    "diff-pruning": ("diff-pruning", "unstructured", "x86-cpu", {"recovery_steps": 3}, {"stride": 250}),
    "ld-pruner": ("ld-pruner", "unstructured", "x86-cpu", {"recovery_steps": 3}, {"chunk": 16}),
    "ecodiff": ("ecodiff", "unstructured", "x86-cpu", {"recovery_steps": 3},
                {"iterations": 3, "steps": 2, "batch": 3, "trajectories": 1}),
}


def batches(pipe):
    """10 calibration latents in batches of 4, 4, 2: uneven, so shards and splits are uneven too."""
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randn(10, 4, 8, 8, generator=g), pipe.family.check_conditions(10), "test").batches(pipe, 4)


def run(out: Path) -> None:
    torch.set_num_threads(1)
    tensors, plans = {}, {}
    with session(ComputeSpec("cpu")) as engine:
        for case, (method, pattern, target, l1grad, options) in CASES.items():
            pipe = tiny(seed=0)
            spec, _ = PruneSpec.resolve(method, 0.3, pattern, "global", False, load_profile(target),
                                        l1grad=L1GradSpec.parse(**l1grad))
            if options is None:
                plan, scores = prune(pipe, spec, batches(pipe), engine=engine), {}
            else:  # prune() with the fast score options the tiny pipeline needs
                scores = {}
                plan = prune_structured(pipe, spec, batches(pipe), score_options=options, scores=scores, engine=engine)
                engine.agree(case, [pipe.unet])
                scores = {path: s.tolist() for path, s in scores["scores"].items()}
            tensors.update({f"{case}/{k}": v.contiguous() for k, v in pipe.unet.state_dict().items()})
            plans[case] = {"plan": plan.to_dict(), "scores": scores}
        if engine.main:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, out / "plans.safetensors")
            (out / "plans.json").write_text(json.dumps({"world": engine.world, "cases": plans}))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
