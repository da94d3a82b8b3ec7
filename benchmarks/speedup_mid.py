"""The speed-up `--speedup X` reaches on a mid-size UNet (benchmarks/precision.py's: 79.7M params, 16x16 latents,
random weights, saved with save_pretrained), as `tinyprune prune` allocates it: the cost table measured here, then
each timed round's pruned UNet against the dense one on onnxruntime CPU, interleaved. Random weights make no
pictures, so quality is not judged, and recovery (which does not change the shapes, hence not the speed) is off.

    python benchmarks/speedup_mid.py                                   # diff-pruning, --speedup 2, 16 latents
    python benchmarks/speedup_mid.py --method ld-pruner --speedup 1.5 --work /tmp/mid
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from precision import mid_pipeline  # noqa: E402
from provenance import command_line, relative_paths  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="diff-pruning")
    ap.add_argument("--speedup", default="2")
    ap.add_argument("--calibration-samples", default="16", help="latents the scores read (data-free)")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="speedup-mid-"))
    work.mkdir(parents=True, exist_ok=True)
    pipe = mid_pipeline(work / "mid-pipeline")
    cmd = ["prune", "--model", str(pipe), "--method", args.method, "--speedup", args.speedup, "--target", "x86-cpu",
           "--recovery-steps", "0", "--calibration-samples", args.calibration_samples, "--out", str(work / "pruned"),
           "--force"]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tinyprune.cli", *cmd], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"prune exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    unet = json.loads((work / "pruned" / "pruning_plan.json").read_text())["components"]["unet"]
    speed = unet["target"]["speedup"]
    rel = relative_paths(work, args.out.resolve())
    result = {"command": command_line("benchmarks/speedup_mid.py", argv, rel),
              "tinyprune": rel(" ".join(["tinyprune", *cmd])), "machine": platform.processor() or platform.machine(),
              "wall_s": round(wall, 1), "params_removed": unet["params_removed"], "groups_removed_whole":
              len(unet["removed_whole"]), "macs": [unet["macs_dense"], unet["macs"]],
              "wanted": speed["wanted"], "met": speed["met"], "predicted": speed["predicted_speedup"],
              "measured": speed["measured"], "rounds": speed["rounds"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speedup_mid.json").write_text(json.dumps(result, indent=2) + "\n")
    m = speed["measured"]
    lines = [f"# --speedup {args.speedup} on a 79.7M-parameter UNet (16x16 latents, random weights)", "",
             f"`{result['command']}`, which ran `{result['tinyprune']}` ({wall:.0f} s wall). Machine: "
             f"{result['machine']}, onnxruntime CPU, {m['threads']} threads, batch 2, interleaved p50. Quality is not "
             "judged (random weights); recovery is off (it does not change the shapes).", "",
             "| round | asked of the cost table | predicted | measured | p50 pruned / dense ms |",
             "|---|---|---|---|---|"]
    for i, x in enumerate(speed["rounds"], 1):
        lines.append(f"| {i} | {x['asked']:.3f}x | {x['predicted']:.2f}x | {x['measured']['speedup']:.2f}x | "
                     f"{x['measured']['p50_ms']:.2f} / {x['measured']['dense_p50_ms']:.2f} |")
    lines += ["", f"Kept: the round that met {speed['wanted']:g}x with the least removed" if speed["met"] else
              f"Not met: {speed['wanted']:g}x asked, the fastest round kept",
              f"({m['speedup']:.2f}x measured); {unet['params_removed']:.3f} of the prunable parameters removed, "
              f"{len(unet['removed_whole'])} groups whole, MACs {unet['macs_dense'] / 1e9:.2f}G -> "
              f"{unet['macs'] / 1e9:.2f}G."]
    (args.out / "speedup_mid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
