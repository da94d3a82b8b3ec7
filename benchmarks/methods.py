"""Every method on the demo, as a user runs it: `tinyprune export` with the method's defaults, then `tinyprune bench`.

For each row the script runs the CLI itself (no flags beyond the method, pattern, target and sample count):
    tinyprune export --method M [--pattern P] --sparsity S --target T --quality Q --out DIR/<row> --json
    tinyprune bench DIR/<row> --backend ort-cpu --compare --threads 2 --no-memory --json
and reads the figures from what the tool wrote: FD (pruned and dense, same prompts and noise), FD ratio, class
accuracy, PSNR/SSIM against dense from report/report.json (the export's quality gates), the prune stage's wall
time from report/timings.json, and the onnxruntime-CPU p50 of the UNet call (batch 2, CFG) and of a whole
generation (text encoder + steps x UNet + VAE decode, 1 image) from bench, whose --compare runs the dense export
interleaved with the pruned one in the same process — so the speed-ups are ratios measured side by side. A gate that
fails (exit 1) still leaves its bundle and report; the row says which gates failed.

    python benchmarks/methods.py                        # the demo, 0.43, Q 20 (200 samples per model)
    python benchmarks/methods.py --rows magnitude,2:4 --quality 2 --out /tmp/m   # a quick look
    python benchmarks/methods.py --rows "l1-grad --beta 0,magnitude --recovery-steps 200,2:4 l1-grad --beta 0" \
        --out benchmarks/results/methods_ablations              # where l1-grad's gain comes from
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

from provenance import command_line, relative_paths  # noqa: E402

# row -> export flags; 2:4 needs sparse tensor cores, so its row targets Orin (the bench still runs here, on ORT CPU)
ROWS = {
    "magnitude": ["--method", "magnitude", "--target", "x86-cpu"],
    "l1-grad": ["--method", "l1-grad", "--target", "x86-cpu"],
    "2:4": ["--method", "magnitude", "--pattern", "2:4", "--target", "jetson"],
    "2:4 l1-grad": ["--method", "l1-grad", "--pattern", "2:4", "--target", "jetson"],
    "diff-pruning": ["--method", "diff-pruning", "--target", "x86-cpu"],
    "ld-pruner": ["--method", "ld-pruner", "--target", "x86-cpu"],
    "ecodiff": ["--method", "ecodiff", "--target", "x86-cpu"],
}
# where l1-grad's difference comes from: its schedule and recovery with magnitude's ranking, and magnitude + recovery
ABLATIONS = {
    "l1-grad --beta 0": ["--method", "l1-grad", "--beta", "0", "--target", "x86-cpu"],
    "magnitude --recovery-steps 200": ["--method", "magnitude", "--recovery-steps", "200", "--target", "x86-cpu"],
    "2:4 l1-grad --beta 0": ["--method", "l1-grad", "--beta", "0", "--pattern", "2:4", "--target", "jetson"],
}


def tinyprune(*args: str) -> tuple[int, dict | None, str]:
    r = subprocess.run([sys.executable, "-m", "tinyprune.cli", *args], capture_output=True, text=True)
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    return r.returncode, out, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def p50(bench: dict, model: str, what: str) -> float:
    (row,) = [r for r in bench["rows"] if r["model"] == model and r["what"] == what]
    return row["p50_ms"]


def measure(name: str, flags: list[str], args, out: Path, log) -> dict:
    bundle = out / name.replace(":", "").replace(" ", "-")
    t0 = time.monotonic()
    if args.reuse and (bundle / "report" / "report.json").is_file():  # re-measure speed only, same bundle
        code, err = (1 if json.loads((bundle / "report" / "report.json").read_text())["failed"] else 0), ""
    else:
        code, _, err = tinyprune("export", "--sparsity", str(args.sparsity), *flags, "--quality", str(args.quality),
                                 "--out", str(bundle), "--force", "--json")
    wall = time.monotonic() - t0
    if code not in (0, 1) or not (bundle / "report" / "report.json").is_file():
        raise SystemExit(f"{name}: export exit {code}: {err}")
    report = json.loads((bundle / "report" / "report.json").read_text())
    timings = json.loads((bundle / "report" / "timings.json").read_text())
    q = report["quality"]
    log(f"{name}: export exit {code} in {wall:.0f} s; FD ratio {q['fd_ratio']:.3f}, accuracy "
        f"{q['pruned']['accuracy']:.3f}; bench ...")
    bcode, bench, berr = tinyprune("bench", str(bundle), "--backend", "ort-cpu", "--compare", "--threads", "2",
                                   "--no-memory", "--iters", str(args.iters), "--gen-iters", str(args.gen_iters),
                                   "--steps", "20", "--target", "x86-cpu", "--json")
    if bench is None:
        raise SystemExit(f"{name}: bench exit {bcode}: {berr}")
    unet_d, unet_p = p50(bench, "dense", "unet"), p50(bench, "pruned", "unet")
    gen_d, gen_p = p50(bench, "dense", "generation"), p50(bench, "pruned", "generation")
    return {"method": name, "flags": flags, "export_exit": code, "failed_gates": report["failed"],
            "sparsity": report["sparsity"]["unet"], "pattern": report.get("pattern"),
            "fd_dense": q["dense"]["fd"], "fd": q["pruned"]["fd"], "fd_ratio": q["fd_ratio"],
            "accuracy_dense": q["dense"]["accuracy"], "accuracy": q["pruned"]["accuracy"],
            "psnr_db": q["psnr_db"], "ssim": q["ssim"], "n_samples": q["n_samples"],
            "prune_s": sum(v for k, v in timings["seconds"].items() if k == "prune" or "calibration" in k), "export_wall_s": round(wall, 1),
            "unet_ms": {"dense": unet_d, "pruned": unet_p}, "unet_speedup": unet_d / unet_p,
            "generation_ms": {"dense": gen_d, "pruned": gen_p}, "generation_speedup": gen_d / gen_p}


def table(rows: list[dict]) -> str:
    head = ("| method | UNet sparsity | FD | FD / dense | accuracy | PSNR vs dense | SSIM | UNet speed-up | "
            "generation speed-up | prune s | gates failed |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['method']} | {r['sparsity']:.3f} | {r['fd']:.2f} | {r['fd_ratio']:.3f} | {r['accuracy']:.3f} | "
        f"{r['psnr_db']:.1f} dB | {r['ssim']:.3f} | {r['unet_speedup']:.2f}x | {r['generation_speedup']:.2f}x | "
        f"{_f(r['prune_s'], '.0f')} | {', '.join(r['failed_gates']) or '-'} |\n" for r in rows)


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join([*ROWS, *ABLATIONS])}")
    ap.add_argument("--sparsity", type=float, default=0.43)
    ap.add_argument("--quality", type=int, default=20, help="yardstick samples per digit (export's --quality)")
    ap.add_argument("--iters", type=int, default=50, help="bench: timed UNet calls per model")
    ap.add_argument("--gen-iters", type=int, default=5, help="bench: timed whole generations per model")
    ap.add_argument("--bundles", type=Path, default=None, help="keep the bundles here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="with --bundles: keep a row's bundle from an earlier run "
                    "and measure its speed again (export wall time then reads 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods")
    args = ap.parse_args(argv)
    names = args.rows.split(",")
    known = ROWS | ABLATIONS
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(known)}")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.bundles or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        rows = [measure(n, known[n], args, where, log) for n in names]
    cmd = command_line("benchmarks/methods.py", argv, relative_paths(where, args.out.parent.resolve()))
    md = (f"# Every method on the demo at sparsity {args.sparsity}\n\n"
          f"Command: `{cmd}` ({time.monotonic() - t0:.0f} s). Machine: {platform.machine()}, "
          f"{platform.processor() or platform.platform()}; onnxruntime CPU, 2 threads. Quality: the export's own gates, "
          f"{rows[0]['n_samples']} samples per model (held-out phrasings, 20 DDIM steps, guidance 3, same noise dense "
          f"and pruned); dense FD {rows[0]['fd_dense']:.2f}, accuracy {rows[0]['accuracy_dense']:.3f}. Speed-ups: "
          f"`tinyprune bench --compare` p50, dense and pruned interleaved; generation = text encoder + 20 x UNet "
          f"(batch 2) + VAE decode. Prune s: the export's prune stage (calibration, scoring, recovery)."
          + (" --reuse: the bundles (their quality figures and prune times) are an earlier run's of the same rows; "
             "only the speed was measured again." if args.reuse else "") + "\n\n"
          + table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
