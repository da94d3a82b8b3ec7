"""Does the bundle make the digits it is asked for, with no PyTorch on the machine?

1. The torch-free runtime (`python -m tinyprune.runtime.generate`) runs in a subprocess where importing torch, diffusers,
   transformers or onnx raises ImportError (a sys.meta_path blocker in a sitecustomize on PYTHONPATH); every
   attempted import is logged and must be none. With --python PY (an environment with only numpy, pillow and
   onnxruntime installed) it runs there instead, from the bundle's own copy as the on-device README says:
   `cd BUNDLE/runtime && PY -m tinyprune.runtime.generate .. ...`. It writes PNGs for the held-out-phrasing prompts of digits 0..9 x --per-class
   (tinyprune.demo.captions.heldout_prompts), one seed, the PyTorch reference's guidance scale.
2. Here, with torch: the shipped digit classifier (judge/quality.py) classifies those PNGs; accuracy against the
   asked digit, overall and per digit. The same prompts through the PyTorch pipeline (tinyprune.model.sampling.sample,
   same seed and initial noise) give the reference accuracy and the runtime-vs-PyTorch PSNR.

    .venv/bin/python benchmarks/runtime_demo.py BUNDLE [--per-class 10] [--steps 20] [--json out.json]
        [--python /path/to/venv-without-torch/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from blocking import blocked_imports  # noqa: E402  (the tests' import blocker: torch, diffusers, transformers, onnx)


def run_without_torch(bundle: Path, prompts: list[str], guidance: float, seed: int, steps: int, out: Path, work: Path,
                      python: str | None = None) -> dict:
    if python is None:
        env, log = blocked_imports(work)
    else:
        env, log = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, work / "blocked.log"
        probe = subprocess.run([python, "-c", "import torch"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0, "torch is importable in the runtime's environment"
    where, target = (ROOT, str(bundle.resolve())) if python is None else (bundle / "runtime", "..")
    cmd = [python or sys.executable, "-m", "tinyprune.runtime.generate", target, "--steps", str(steps), "--seed", str(seed),
           "--guidance", str(guidance), "--out", str(out.resolve()), "--npy", "--quiet"]
    cmd += [a for p in prompts for a in ("--prompt", p)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"runtime failed:\n{proc.stderr}")
    attempted = log.read_text().split() if log.exists() else []
    result = json.loads(proc.stdout)
    result["wall_s"] = round(wall, 2)
    result["blocked_imports_attempted"] = attempted
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--python", default=None, help="interpreter of an environment without torch (default: this "
                    "one, with torch, diffusers and onnx blocked)")
    args = ap.parse_args(argv)

    from tinyprune.demo.captions import heldout_prompts
    from tinyprune.judge.drift import psnr
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.judge.quality import load_classifier, predict
    from tinyprune.model.sampling import DEFAULT_GUIDANCE, sample

    labels = [c for _ in range(args.per_class) for c in range(10)]
    prompts = heldout_prompts(labels)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rt = run_without_torch(args.bundle, prompts, DEFAULT_GUIDANCE, args.seed, args.steps, tmp / "png", tmp,
                               args.python)
        from PIL import Image

        pngs = np.stack([np.asarray(Image.open(f)) for f in rt["files"]])
        runtime_float = np.load(tmp / "png" / "images.npy")
    images = pngs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    clf = load_classifier()
    pred = predict(clf, images)
    lab = np.asarray(labels)
    ref = sample(load_pipeline(args.bundle / "pruned"), prompts, seed=args.seed, steps=args.steps,
                 guidance=DEFAULT_GUIDANCE).numpy()
    ref_pred = predict(clf, ref)
    out = {
        "bundle": str(args.bundle), "environment": args.python or "this one, torch blocked", "images": len(labels),
        "guidance": DEFAULT_GUIDANCE, "steps": args.steps, "seed": args.seed,
        "runtime": {k: rt[k] for k in ("backend", "scheduler", "seconds", "wall_s", "blocked_imports_attempted")},
        "accuracy_runtime_png": float(np.mean(pred == lab)),
        "accuracy_per_class": {int(c): float(np.mean(pred[lab == c] == c)) for c in range(10)},
        "accuracy_pytorch": float(np.mean(ref_pred == lab)),
        "runtime_vs_pytorch_psnr_db": psnr(ref, runtime_float, 1.0),
        "runtime_vs_pytorch_max_abs": float(np.abs(ref - runtime_float).max()),
        "predictions_agree": float(np.mean(pred == ref_pred)),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
