"""`python -m tinyprune.runtime bench BUNDLE`: this board's latency and memory for a bundle, as one JSON, with
numpy and onnxruntime (or TensorRT engines) only: no PyTorch, no tinyprune install (the bundle's runtime/ copy
runs it), so it runs where the bundle is deployed.

* Components: each component the generation loop runs (text encoders, unet, vae_decoder), on random inputs of
  the manifest's opt shape (the UNet at its opt batch: [uncond, cond] where the family guides; the others at
  batch 1): p50/p90/mean over --iters calls after --warmup.
* Generation: one image through the runtime's own loop (runtime/generate.py: tokenization and text encoding,
  steps x UNet with the bundle's guidance, DDIM, VAE decode) --gen-iters times, and the time between two UNet
  steps inside it.
* Memory: per row, a fresh process loads the backend's libraries, then activates the row's runner(s) and runs
  once; the figure is its peak-RSS increase (Linux VmHWM, reset through /proc/self/clear_refs). --no-memory
  skips it. On CUDA and TensorRT this is host memory only.

`tinyprune bench-merge A.json B.json ...` puts several boards' files in one table and plot.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .errors import InputError, TinypruneError
from .generate import BACKENDS, DEFAULT_STEPS, Runtime, make_runner, ort_providers, read_json, runtime_components
from .measure import board, component_feed, cores, cpu_name, interleaved, reset_peak_rss, stats_ms, status_kb

FORMAT = "tinyprune-bench/1"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the dir holding tinyprune/ (the bundle's runtime/ copy too)


def _manifest(bundle: Path) -> dict:
    return read_json(bundle / "manifest.json", "not a tinyprune bundle")


def _versions(backend: str) -> dict:
    import numpy

    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    if backend.startswith("ort"):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    else:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    return out


def device_info(name: str | None) -> dict:
    model = board()
    return {"name": name or model or platform.node(), "board": model, "cpu": cpu_name(), "cores": cores(),
            "arch": platform.machine(), "system": f"{platform.system()} {platform.release()}"}


def _load_backend(backend: str) -> None:
    """Import the backend's libraries (outside the memory figure)."""
    ort_providers()
    if backend == "trt":
        import tensorrt  # noqa: F401


def probe(spec: dict) -> dict:
    """In a fresh process: the peak-RSS increase of activating one row's runner(s) and running it once."""
    bundle, backend, threads = Path(spec["bundle"]), spec["backend"], spec["threads"]
    _load_backend(backend)
    ok = reset_peak_rss()
    rss0 = status_kb("VmRSS")
    if spec["what"] == "generation":
        with Runtime(bundle, backend, threads) as rt:
            rt.generate(rt.conditioning.example(1), steps=spec["steps"], scheduler="ddim")
    else:
        with make_runner(bundle, spec["what"], backend, threads) as r:
            r(component_feed(_manifest(bundle)["components"], spec["what"]))
    peak = status_kb("VmHWM")
    return {"peak_rss_mb": round(max(0, peak - rss0) / 1024, 1) if ok and peak and rss0 else None}


def _memory(bundle: Path, what: str, backend: str, threads: int, steps: int) -> float | None:
    spec = json.dumps({"bundle": str(bundle), "what": what, "backend": backend, "threads": threads, "steps": steps})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "tinyprune.runtime", "bench", "--probe", spec], capture_output=True,
                          text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TinypruneError(f"memory probe of {what} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _shape(feed: dict) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feed.items())


def bench(bundle: str | Path, backend: str = "ort-cpu", warmup: int = 3, iters: int = 20, gen_iters: int = 3,
          steps: int = DEFAULT_STEPS, threads: int = 0, device: str | None = None, memory: bool = True,
          log=lambda msg: None) -> dict:
    for name, v, lo in (("--warmup", warmup, 0), ("--iters", iters, 1), ("--gen-iters", gen_iters, 1),
                        ("--steps", steps, 1), ("--threads", threads, 0)):
        if v < lo:
            raise InputError(f"{name} must be >= {lo}, got {v}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; the runtime has: {', '.join(BACKENDS)}")
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError(f"bundle {bundle} does not exist or is not a directory")
    manifest = _manifest(bundle)
    names = runtime_components(bundle)
    _load_backend(backend)
    result = {
        "format": FORMAT, "device": device_info(device), "backend": backend, "versions": _versions(backend),
        "precision": manifest.get("precision", "fp32"),
        "bundle": {"path": str(bundle), "profile": manifest.get("profile"), "method": manifest.get("method"),
                   "pattern": manifest.get("pattern"), "sparsity": manifest.get("sparsity"),
                   "source": manifest.get("source", {}).get("model")},
        "settings": {"warmup": warmup, "iters": iters, "gen_iters": gen_iters, "steps": steps,
                     "threads": threads or "default", "scheduler": "ddim"},
        "components": {},
    }
    for comp in names:
        feed = component_feed(manifest["components"], comp)
        log(f"{comp}: {warmup} warm-up + {iters} timed calls ({_shape(feed)})")
        with make_runner(bundle, comp, backend, threads) as r:
            times = interleaved({comp: lambda: r(feed)}, warmup, iters)[comp]
        result["components"][comp] = {"shape": _shape(feed), **stats_ms(times),
                                      "peak_rss_mb": _memory(bundle, comp, backend, threads, steps) if memory else None}
    log(f"generation: 1 image, {steps} steps, {gen_iters} timed runs after 1 warm-up")
    steps_s, runs = [], []
    with Runtime(bundle, backend, threads) as rt:
        condition = rt.conditioning.example(1)
        for i in range(gen_iters + 1):
            stamps = []
            t0 = time.perf_counter()
            rt.generate(condition, steps=steps, scheduler="ddim", callback=lambda d, t: stamps.append(time.perf_counter()))
            if i:  # the first run warms up
                runs.append(time.perf_counter() - t0)
                steps_s += [b - a for a, b in zip(stamps, stamps[1:])]
        guided = rt.conditioning.guided
    result["generation"] = {
        "shape": f"1 image, {steps} steps, UNet batch {2 if guided else 1}", **stats_ms(runs),
        "step": stats_ms(steps_s) if steps_s else None,
        "peak_rss_mb": _memory(bundle, "generation", backend, threads, steps) if memory else None}
    result["peak_rss_mb"] = round((status_kb("VmHWM") or 0) / 1024, 1) or None
    return result


def main(argv: list[str]) -> int:
    import argparse

    if argv[:1] == ["--probe"]:
        print(json.dumps(probe(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m tinyprune.runtime bench",
                                description="Latency and memory of a bundle on this board, as JSON, without PyTorch.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=20, help="timed calls per component")
    p.add_argument("--gen-iters", type=int, default=3, help="timed whole generations")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps per generation")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--device", default=None, help="the board's name in the results (default: its device-tree "
                                                  "model, else the host name)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row memory probes")
    p.add_argument("--out", default=None, help="write the JSON here too (default: stdout only)")
    args = p.parse_args(argv)
    try:
        r = bench(args.bundle, args.backend, args.warmup, args.iters, args.gen_iters, args.steps, args.threads,
                  args.device, not args.no_memory, log=lambda m: print(m, file=sys.stderr, flush=True))
    except TinypruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    text = json.dumps(r, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
