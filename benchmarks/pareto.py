"""Speed at equal quality on the demo: `tinyprune sweep` over methods and speed-ups, as a user runs it, with its
Pareto plot copied into benchmarks/results/pareto/ and a table in benchmarks/results/pareto.md.

    python benchmarks/pareto.py                                    # the methods below, --speedup 1.5,2,3, Q 10
    python benchmarks/pareto.py --methods diff-pruning,magnitude --speedups 2 --quality 2 --out /tmp/p   # a look

Every figure is the sweep's own (sweep.json): the UNet's p50 on onnxruntime CPU here against the dense UNet's,
interleaved in one run per point (batch 2), FD ratio and class accuracy against dense on the same prompts and noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import command_line, relative_paths  # noqa: E402

METHODS = "diff-pruning,ld-pruner,ecodiff,magnitude,l1-grad"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--speedups", default="1.5,2,3")
    ap.add_argument("--target", default="x86-cpu")
    ap.add_argument("--quality", type=int, default=10, help="samples per digit at each point")
    ap.add_argument("--calibration-samples", type=int, default=None, help="the sweep's --calibration-samples")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        rel = relative_paths(work, out)
        sweep = ["sweep", "--method", args.methods, "--speedup", args.speedups, "--target", args.target,
                 "--quality", str(args.quality), "--out", str(work / "sweep"), "--json"]
        if args.calibration_samples:
            sweep += ["--calibration-samples", str(args.calibration_samples)]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "tinyprune.cli", *sweep], capture_output=True, text=True)
        minutes = (time.monotonic() - t0) / 60
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        data = json.loads(r.stdout)
        (out / "pareto").mkdir(parents=True, exist_ok=True)
        for name in ("sweep.json", "pareto.png", "sweep.png"):
            shutil.copyfile(work / "sweep" / name, out / "pareto" / name)
        rows = data["rows"]
        lines = [
            "# Speed-up vs quality on the demo: every method, structured ones at each speed-up",
            "",
            f"`{command_line('benchmarks/pareto.py', argv, rel)}`, which ran",
            f"`tinyprune {rel(' '.join(sweep))}`",
            "",
            f"Machine: {data['speed']['machine']}, {platform.machine()}; {minutes:.1f} min. UNet speed-up: onnxruntime CPU, "
            f"{data['speed']['threads']} threads, batch {data['speed']['batch']}, p50 of the pruned UNet against the dense "
            f"one, interleaved, one run per point. FD ratio / accuracy: {data['n_samples']} samples, seed {data['seed']}, "
            f"same prompts and noise as dense (dense accuracy {rows[0]['dense_accuracy']:.3f}). Plot: "
            "`pareto/pareto.png`; figures: `pareto/sweep.json`.",
            "",
            "| method | target | params removed | UNet speed-up (predicted) | FD ratio | accuracy | PSNR dB | "
            f"{data['profile']} gates | front (FD / accuracy) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(rows, key=lambda x: (x["method"], x["speedup"])):
            asked = f"--speedup {row['speedup_asked']:g}" if row["target"] == "speedup" else f"--sparsity {row['sparsity']:g}"
            pred = f" ({row['speedup_predicted']:.2f}x)" if row["speedup_predicted"] else ""
            psnr = "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
            front = " / ".join("yes" if row[k] else "-" for k in ("pareto_fd", "pareto_accuracy"))
            lines.append(f"| {row['method']} | {asked} | {row['achieved']:.3f} | {row['speedup']:.2f}x{pred} | "
                         f"{row['fd_ratio']:.3f} | {row['accuracy']:.3f} | {psnr} | "
                         f"{'pass' if row['gates_ok'] else 'fail'} | {front} |")
        (out / "pareto.md").write_text(rel("\n".join(lines)) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
