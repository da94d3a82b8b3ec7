"""Every pipeline family through `tinyprune export`, every method: time, memory, sparsity, drift, size.

The tiny random-weight pipelines of tests/pipelines.py (sd, sd2, sdxl, lcm, taesd, ddpm, ldm) are built and
saved once each, then for every (family, method) the real CLI runs in its own subprocess:

    .venv/bin/tinyprune export --model DIR --sparsity 0.43 --target TARGET --method M [--pattern 2:4]
        --out BUNDLE --force --json --image-steps 4 --image-checks 2 [--recovery-steps 0 [--iterations 2]]

Methods: magnitude, l1-grad, 2:4 (= magnitude --pattern 2:4, on jetson-orin-nano: 2:4 needs a target with sparse
tensor cores), diff-pruning, ld-pruner, ecodiff; every one but 2:4 targets x86-cpu. Recovery is off
(--recovery-steps 0) for l1-grad (which also gets 2 prune steps instead of 4) and the structured methods, so the
figures are the cost of pruning + export + checks, not of fine-tuning.

Per run: exit code (0 all gates passed; 1 a gate failed, expected on random weights; 2 bad input), wall seconds
(perf_counter around the subprocess), the child's own peak RSS (ru_maxrss from os.wait4: getrusage(RUSAGE_CHILDREN)
would be the max over all children so far), the achieved sparsity and the max |ONNX - PyTorch| of every
component (from the --json result, else BUNDLE/report/report.json), for structured methods the UNet's prunable
parameters dense -> pruned, and the size of unet/model.onnx (plus its external data, if any).

    .venv/bin/python benchmarks/families.py [--families sd,ddpm] [--methods magnitude,2:4] [--work DIR]
        [--out-dir benchmarks/results]          # writes OUT_DIR/families.md and OUT_DIR/families.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from provenance import command_line, relative_paths

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from pipelines import FAMILIES, save  # noqa: E402

CLI = ROOT / ".venv" / "bin" / "tinyprune"
STRUCTURED = ("diff-pruning", "ld-pruner", "ecodiff")
METHODS = ("magnitude", "l1-grad", "2:4", *STRUCTURED)
SPARSE_TARGET = "jetson-orin-nano"  # sparse_tensor_cores = true (profiles/jetson-orin-nano.toml)


def method_args(method: str) -> list[str]:
    if method == "2:4":
        return ["--target", SPARSE_TARGET, "--method", "magnitude", "--pattern", "2:4"]
    args = ["--target", "x86-cpu", "--method", method]
    if method == "l1-grad":
        args += ["--recovery-steps", "0", "--iterations", "2"]
    elif method in STRUCTURED:
        args += ["--recovery-steps", "0"]
    return args


def parse_json(stdout: str) -> dict | None:
    """The --json result: the one JSON object on stdout (the CLI logs to stderr)."""
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(stdout[start:])[0]
    except json.JSONDecodeError:
        return None


def drift_by_component(drift: list[dict]) -> dict:
    """The max over a component's checked outputs ("unet.out_sample (batch 1)", "(batch 2)", ...)."""
    worst, ok = {}, {}
    for d in drift:
        comp = d["name"].split(".")[0]
        worst[comp] = max(worst.get(comp, 0.0), d["max_abs"])
        ok[comp] = ok.get(comp, True) and d["ok"]
    return {"max_abs_drift": worst, "drift_ok": ok}


def unet_params(report: dict, bundle: Path) -> tuple[int, int] | None:
    """UNet prunable params (dense, pruned): from the report's pruning record where it has them, else from the
    claims stamped into unet/model.onnx (tinyprune.params_dense / tinyprune.params, channel pruning only)."""
    rec = (report.get("pruning") or {}).get("unet") or {}
    for d in (rec, rec.get("scores") or {}):
        if "params_dense" in d and "params" in d:
            return int(d["params_dense"]), int(d["params"])
    path = bundle / "unet" / "model.onnx"
    if not path.is_file():
        return None
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "tinyprune.params_dense" in meta and "tinyprune.params" in meta:
        return int(meta["tinyprune.params_dense"]), int(meta["tinyprune.params"])
    return None


def onnx_mb(bundle: Path) -> float | None:
    """unet/model.onnx with its external-data files: what a device has to hold."""
    d = bundle / "unet"
    if not (d / "model.onnx").is_file():
        return None
    return round(sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
                 / 2**20, 3)


def run_one(family: str, method: str, model: Path, work: Path) -> dict:
    bundle = work / "bundles" / f"{family}-{method.replace(':', 'to')}"
    argv = [str(CLI), "export", "--model", str(model), "--sparsity", "0.43", *method_args(method),
            "--out", str(bundle), "--force", "--json", "--image-steps", "4", "--image-checks", "2"]
    print(f"[{family} {method}] {shlex.join(argv)}", file=sys.stderr, flush=True)
    log = work / "logs" / f"{bundle.name}.stderr"
    for d in (bundle.parent, log.parent):  # the CLI wants --out's parent to exist
        d.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True)
        stdout = proc.stdout.read()
        # wait4, not proc.wait(): only wait4 returns this child's own rusage
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    report = parse_json(stdout)
    if report is None and (bundle / "report" / "report.json").is_file():
        report = json.loads((bundle / "report" / "report.json").read_text())
    report = report or {}
    entry = {
        "family": family, "method": method, "argv": argv, "exit_code": code, "seconds": round(seconds, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "sparsity": report.get("sparsity", {}),
        "failed": report.get("failed", []),
        **drift_by_component(report.get("onnx_drift", [])),
        "unet_params": unet_params(report, bundle) if method in STRUCTURED else None,
        "unet_onnx_mb": onnx_mb(bundle),
        "result": report or None,
    }
    if code not in (0, 1) or not report:  # a crash or bad input: its stderr is the evidence
        entry["stderr_tail"] = log.read_text()[-4000:]
    print(f"[{family} {method}] exit {code}, {seconds:.0f} s, peak RSS {entry['peak_rss_mb']:.0f} MB",
          file=sys.stderr, flush=True)
    return entry


def table(runs: list[dict]) -> str:
    def comps(d: dict, fmt) -> str:
        return ", ".join(f"{k} {fmt(v)}" for k, v in d.items()) or "-"

    lines = ["| family | method | exit | sparsity | UNet params dense → pruned | max \\|drift\\| per component "
             "| seconds | peak RSS MB | unet.onnx MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        drift = ", ".join(f"{k} {v:.2e}{'' if r['drift_ok'].get(k, True) else ' (over tol)'}"
                          for k, v in r["max_abs_drift"].items()) or "-"
        params = f"{r['unet_params'][0]} → {r['unet_params'][1]}" if r["unet_params"] else "-"
        mb = "-" if r["unet_onnx_mb"] is None else f"{r['unet_onnx_mb']:.2f}"
        code = f"{r['exit_code']} ({', '.join(r['failed'])})" if r["failed"] else str(r["exit_code"])
        lines.append(f"| {r['family']} | {r['method']} | {code} | {comps(r['sparsity'], lambda s: f'{s:.3f}')} "
                     f"| {params} | {drift} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {mb} |")
    return "\n".join(lines)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--work", default=None, help="pipelines, bundles and logs (default: a temp dir, removed)")
    ap.add_argument("--out-dir", default=str(HERE / "results"), help="where families.md and families.json go")
    args = ap.parse_args(argv)
    families, methods = args.families.split(","), args.methods.split(",")
    bad = [f for f in families if f not in FAMILIES] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    out_dir = Path(args.out_dir).resolve()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="families-")
    work = Path(args.work or tmp.name).resolve()

    import torch

    machine = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "diffusers": _version("diffusers"),
               "tinyprune": _version("tinyprune")}
    runs, builds = [], {}
    for family in families:
        t0 = time.perf_counter()
        model = save(family, work / "pipelines" / family)
        builds[family] = round(time.perf_counter() - t0, 1)
        for method in methods:
            runs.append(run_one(family, method, model, work))

    # the results name no path of this machine
    rel = relative_paths(work, out_dir)
    command = command_line("benchmarks/families.py", argv, rel)
    header = (f"# tinyprune export on every tiny pipeline family\n\nCommand: `{command}` (from the repo root)\n\n"
              f"Machine: {machine['nproc']} CPUs (nproc), {machine['platform']}, Python {machine['python']}, "
              f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, diffusers {machine['diffusers']}, "
              f"tinyprune {machine['tinyprune']}\n\nsparsity: per pruned component (structured methods: the fraction of "
              f"prunable UNet parameters removed); drift: max |ONNX - PyTorch| per exported component; exit 1 = a gate "
              f"failed (named; expected on random weights). Pipeline build seconds: "
              + ", ".join(f"{f} {s}" for f, s in builds.items()) + "\n")
    md = rel(header + "\n" + table(runs) + "\n")
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "families.md").write_text(md)
    data = {"command": command, "machine": machine, "build_s": builds, "runs": runs}
    (out_dir / "families.json").write_text(rel(json.dumps(data, indent=2, default=str)) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
