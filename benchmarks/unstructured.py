"""Unstructured and 2:4 pruning on the demo pipeline: magnitude vs l1-grad vs 2:4-magnitude vs 2:4-l1-grad.

One run, one table: FD against the held-out real digits (classifier feature space), class accuracy, PSNR and
SSIM of pruned vs dense images (same labels, seeds and initial noise), achieved sparsity, pruning time. All
methods share one set of calibration batches (data-free: the dense model's own samples), built once and
timed on its own row; "prune s" is the method's own time given those batches.

Ablation rows (on unless --no-ablations) say where l1-grad's difference comes from: magnitude followed by
the same L1 recovery, l1-grad with beta = 0 (magnitude ranking, same schedule and recovery), and the
recovery fitting the true noise (--recovery-target noise) instead of distilling the dense UNet's epsilon.

    python benchmarks/unstructured.py                       # the demo pipeline, sparsity 0.43
    python benchmarks/unstructured.py --tiny --n-per-class 2  # smoke run on the tiny random pipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny pipeline (--tiny)

from exporter import quality  # noqa: E402
from tinyprune.model.calibration import calibration_batches  # noqa: E402
from tinyprune.config import L1GradSpec, PruneSpec, load_profile  # noqa: E402
from tinyprune.model.pipeline import demo_dir, load_pipeline  # noqa: E402
from pipelines import tiny as tiny_pipeline  # noqa: E402
from tinyprune.prune.run import prune  # noqa: E402


def rows(ablations: bool, recovery_steps: int | None):
    r = L1GradSpec.parse(recovery_steps=recovery_steps)  # l1-grad's defaults: recovery distils the dense UNet
    out = [("magnitude", "magnitude", "unstructured", L1GradSpec.parse(recovery_steps=0)),
           ("l1-grad", "l1-grad", "unstructured", r),
           ("2:4 magnitude", "magnitude", "2:4", L1GradSpec.parse(recovery_steps=0)),
           ("2:4 l1-grad", "l1-grad", "2:4", r)]
    if ablations:
        steps = r.recovery_steps if r.recovery_steps is not None else 200
        noise = L1GradSpec.parse(recovery_steps=recovery_steps, recovery_target="noise")
        out += [("magnitude + recovery", "magnitude", "unstructured", L1GradSpec.parse(recovery_steps=steps)),
                ("l1-grad beta=0", "l1-grad", "unstructured", L1GradSpec.parse(beta=0.0, recovery_steps=recovery_steps)),
                ("2:4 magnitude + recovery", "magnitude", "2:4", L1GradSpec.parse(recovery_steps=steps)),
                ("l1-grad --recovery-target noise", "l1-grad", "unstructured", noise),
                ("2:4 l1-grad --recovery-target noise", "l1-grad", "2:4", noise)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline dir (default: the shipped demo)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random pipeline (smoke run)")
    ap.add_argument("--sparsity", type=float, default=0.43)
    ap.add_argument("--n-per-class", type=int, default=quality.DEFAULT_N_PER_CLASS)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the evaluation")
    ap.add_argument("--recovery-steps", type=int, default=None, help="l1-grad's recovery (default: its own, 200)")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/unstructured")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.tiny:
        dense, model_name = tiny_pipeline(seed=0), "tiny (random weights)"
    else:
        path = Path(args.model) if args.model else demo_dir()
        dense, model_name = load_pipeline(path), path.name if args.model else "demo pipeline"
    profile = load_profile("jetson")
    clf = quality.load_classifier()
    real = quality.features(clf, quality.real_digits()[0])
    labels = list(range(int(clf.config["num_classes"]))) * args.n_per_class

    def measure(images):
        return {"fd": quality.frechet_distance(quality.features(clf, images), real),
                "accuracy": quality.class_accuracy(clf, images, labels)}

    ref = quality.generate(dense, labels, seed=0, steps=args.steps)
    base = measure(ref)
    t = time.perf_counter()
    batches = calibration_batches(dense, seed=0)
    calib_s = time.perf_counter() - t
    table = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "fd": base["fd"], "fd_ratio": 1.0,
              "accuracy": base["accuracy"], "psnr_db": float("inf"), "ssim": 1.0, "prune_s": 0.0}]
    print(f"dense: FD {base['fd']:.3f}, accuracy {base['accuracy']:.4f}; calibration {calib_s:.1f} s "
          f"({sum(len(b.t) for b in batches)} latents)", flush=True)
    for label, method, pattern, opts in rows(not args.no_ablations, args.recovery_steps):
        pipe = copy.deepcopy(dense)
        spec, _ = PruneSpec.resolve(method, args.sparsity, pattern, "global", False, profile, l1grad=opts)
        t = time.perf_counter()
        plan = prune(pipe, spec, batches).to_dict()
        prune_s = time.perf_counter() - t
        images = quality.generate(pipe, labels, seed=0, steps=args.steps)
        m = measure(images)
        row = {"method": label, "pattern": pattern, "sparsity": round(plan["components"]["unet"]["sparsity"], 5),
               "fd": m["fd"], "fd_ratio": m["fd"] / base["fd"], "accuracy": m["accuracy"],
               "psnr_db": quality.psnr(ref, images), "ssim": quality.ssim(ref, images), "prune_s": prune_s,
               "recovery_steps": spec.recovery_steps}
        u = plan["components"]["unet"]
        if "l1_grad" in u:
            row["regrown"] = u["l1_grad"]["regrown"]
            row["calib_loss"] = [u["l1_grad"]["loss_dense"], u["l1_grad"]["loss_pruned"]]
        if "recovery" in u:
            row["calib_loss"] = [u["recovery"]["loss_before"], u["recovery"]["loss_after"]]
        table.append(row)
        print(json.dumps(row), flush=True)
        del pipe

    head = (f"# Unstructured and 2:4 pruning, {model_name}, requested sparsity {args.sparsity}\n\n"
            f"{len(labels)} samples ({args.n_per_class} per class), {args.steps} DDIM steps, same seeds dense and "
            f"pruned; FD against held-out real digits in the demo classifier's feature space. Calibration "
            f"(data-free, shared by all rows): {sum(len(b.t) for b in batches)} latents, {calib_s:.1f} s. "
            f"torch threads {args.threads}; total {time.perf_counter() - t0:.0f} s.\n\n"
            "| method | pattern | sparsity | FD | FD / dense | accuracy | PSNR vs dense (dB) | SSIM | prune s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['fd']:.3f} | {r['fd_ratio']:.3f} | "
                   f"{r['accuracy']:.3f} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['prune_s']:.1f} |\n"
                   for r in table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(head + body)
    out.with_suffix(".json").write_text(json.dumps({"model": model_name, "args": {**vars(args), "out": "(this file)"}, "calibration_s": calib_s,
                                                    "rows": table}, indent=2, default=str) + "\n")
    print(head + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
