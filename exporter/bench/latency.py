"""`tinyprune bench`: latency (p50/p90/mean) and peak memory per component and for a whole generation.

* Components: each ONNX component of the bundle at the shape one generation runs it at: the UNet at the
  manifest's opt batch (2 = [uncond, cond]), the VAE encoder/decoder at batch 1 (one image), latent size opt.
* Generation: the torch-free runtime's own loop (tinyprune.runtime.generate: numpy scheduler, CFG, steps x UNet, VAE
  decode) for one image; "generation step" is the time between two UNet steps inside that loop.
* Backends: ort-cpu, ort-cuda, trt (bundle's build/<component>.engine), torch and torch-cuda (the bundle's
  pruned/ pipeline through the same loop). An absent backend is BackendMissing (exit 3).
* --compare: the dense model side by side in one run, iterations interleaved (ABBA order) so that a noisy,
  shared machine slows both alike. Dense = a given dense bundle, or the bundle's source pipeline exported to
  a temporary dir here (ONNX backends) or loaded as it is (torch backends).
* Memory: per model and row, a fresh process (python -m tinyprune.bench.latency PROBE) activates the row's runner(s) and
  runs once; the figure is its peak-RSS increase over that (Linux VmHWM, reset through /proc/self/clear_refs;
  no psutil) and, on torch-cuda, torch's max allocated. ONNX backends: the libraries are imported before, so the
  session (its copy of the weights, its arena) and one run are inside; torch backends: the pipeline is loaded
  before, so the figure is what running adds. --no-memory skips the probes.
* Budgets: the profile's latency_budget_ms (unet, generation) against the pruned model's p50: GateFailed
  (exit 1) when over.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from tinyprune.errors import BackendMissing, GateFailed, InputError
from tinyprune.runtime.measure import (component_feed as _feed, cores, cpu_name, interleaved, reset_peak_rss,
                                      stats_ms, status_kb)

BENCH_BACKENDS = ("ort-cpu", "ort-cuda", "trt", "torch", "torch-cuda")
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "trt")


# --------------------------------------------------------------------------- memory (Linux /proc, no psutil)

class PeakMemory:
    """Peak RSS increase over a block (MB), and torch's CUDA max allocated where asked."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.rss_mb = self.cuda_mb = None

    def __enter__(self):
        gc.collect()
        self.hwm_ok = reset_peak_rss()
        self.rss0 = status_kb("VmRSS")
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        peak = status_kb("VmHWM")
        if self.hwm_ok and peak is not None and self.rss0 is not None:
            self.rss_mb = round(max(0, peak - self.rss0) / 1024, 1)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.cuda_mb = round((torch.cuda.max_memory_allocated() - self.cuda0) / 2**20, 1)


# --------------------------------------------------------------------------- backends and models

def check_backend(backend: str) -> None:
    if backend not in BENCH_BACKENDS:
        raise InputError(f"unknown backend {backend!r}; known: {', '.join(BENCH_BACKENDS)}")
    if backend.startswith("ort"):
        from tinyprune.runtime.generate import ort_providers

        providers = ort_providers()
        if backend == "ort-cuda" and "CUDAExecutionProvider" not in providers:
            raise BackendMissing("onnxruntime here has no CUDAExecutionProvider: install onnxruntime-gpu on a CUDA "
                                 "machine, or use --backend ort-cpu")
    elif backend == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendMissing("tensorrt is not installed here: pip install 'tinyprune[trt]' on a GPU machine")
    else:
        if importlib.util.find_spec("torch") is None:
            raise BackendMissing("torch is not installed here")
        if backend == "torch-cuda":
            import torch

            if not torch.cuda.is_available():
                raise BackendMissing("torch here has no CUDA device: use --backend torch (CPU)")


def available_backends() -> list[str]:
    ok = []
    for b in BENCH_BACKENDS:
        try:
            check_backend(b)
            ok.append(b)
        except BackendMissing:
            pass
    return ok


class Model:
    """One side of the comparison: ONNX components (onnx_dir), runtime/ files (runtime_dir), a PyTorch pipeline."""

    def __init__(self, name: str, onnx_dir: Path | None, pipeline_dir: Path | None, manifest: dict,
                 runtime_dir: Path | None = None):
        self.name, self.onnx_dir, self.pipeline_dir, self.manifest = name, onnx_dir, pipeline_dir, manifest
        self.runtime_dir = runtime_dir or onnx_dir
        self._pipe = None

    def pipe(self):
        if self._pipe is None:
            from tinyprune.model.pipeline import load_pipeline

            self._pipe = load_pipeline(self.pipeline_dir)
        return self._pipe

    def runner(self, component: str, backend: str, threads: int):
        if backend in ONNX_BACKENDS:
            from tinyprune.runtime.generate import make_runner

            return make_runner(self.onnx_dir, component, backend, threads)
        from tinyprune.export.specs import component_spec
        from tinyprune.judge.torch_runner import TorchRunner

        if threads:
            import torch

            torch.set_num_threads(threads)
        pipe = self.pipe()
        spec = component_spec(pipe, component)
        return TorchRunner(spec.module(pipe), spec.inputs, spec.outputs,
                           "cuda" if backend == "torch-cuda" else "cpu")


def _components(manifest: dict) -> list[str]:
    order = ("unet", "vae_decoder", "vae_encoder", "text_encoder")
    names = list(manifest.get("components", {}))
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def _primary(feed: dict) -> str:
    """The input a row's shape names: the latents or the token ids (the manifest lists inputs sorted by name)."""
    return next((n for n in ("sample", "latent_sample", "input_ids") if n in feed), max(feed, key=lambda n: feed[n].size))


def component_feed(manifest: dict, component: str, seed: int = 0) -> dict[str, np.ndarray]:
    return _feed(manifest["components"], component, seed)


def _export_dense(model_dir: Path, manifest: dict, profile, out: Path, log) -> dict:
    """The dense source pipeline's components to ONNX in `out` (same profile and opset as the bundle) + runtime/."""
    from tinyprune import __version__
    from tinyprune.export.specs import component_specs, export_spec
    from tinyprune.export.writer import MAX_EXPORT_OPSET, export_component
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.ship.runtime_files import write_runtime_dir

    dense = load_pipeline(model_dir)
    xspec = export_spec(dense, profile, MAX_EXPORT_OPSET)
    meta = {"version": __version__, "method": "none", "pattern": "none", "profile": profile.name,
            "source_sha256": manifest["source"]["sha256"]}
    comps = {}
    for comp in component_specs(dense):
        if comp.name not in manifest.get("components", {}):
            continue
        log(f"exporting dense {comp.name} for the comparison")
        export_component(dense, comp, xspec, out / comp.name / "model.onnx", meta)
        comps[comp.name] = {"file": f"{comp.name}/model.onnx", "inputs": comp.trt_shapes(xspec)}
    write_runtime_dir(dense, out)
    dense_manifest = {"profile": profile.name, "sparsity": 0.0, "components": comps, "source": manifest["source"]}
    (out / "manifest.json").write_text(json.dumps(dense_manifest, indent=2))
    return dense_manifest


def _source_dir(manifest: dict, bundle: Path, model: str | None) -> Path:
    from tinyprune.model.pipeline import demo_dir, tree_sha256

    if model is None and manifest["source"]["model"] != "demo":
        raise InputError(f"{bundle} was not made from the demo pipeline: pass --model with the dense pipeline dir, "
                         "or --dense with a dense bundle")
    model_dir = Path(model) if model else demo_dir()
    if tree_sha256(model_dir) != manifest["source"]["sha256"]:
        raise InputError(f"{model_dir} is not the pipeline {bundle} was made from (source sha256 differs)")
    return model_dir


# --------------------------------------------------------------------------- timing

def _sync(backend: str):
    if backend == "torch-cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def component_job(m: "Model", comp: str, feed: dict, backend: str, threads: int):
    """(call, close) for one component of one model, activated."""
    r = m.runner(comp, backend, threads)
    r.activate()
    return (lambda: r(feed)), r.deactivate


def generation_job(m: "Model", backend: str, threads: int, steps: int, sync, step_times: list | None = None):
    """(call, close): one whole generation (1 image, DDIM) through the runtime's loop (text encoders included); per-step durations are
    appended to step_times."""
    from tinyprune.runtime.generate import Runtime, runtime_components

    runners = {c: m.runner(c, backend, threads) for c in runtime_components(m.runtime_dir)}
    rt = Runtime(m.runtime_dir, backend, threads, runners=runners)
    condition = rt.conditioning.example(1)
    rt.activate()
    stamps = []

    def cb(done, total):
        sync()
        stamps.append(time.perf_counter())

    def job():
        stamps.clear()
        t0 = time.perf_counter()
        rt.generate(condition, seed=0, steps=steps, scheduler="ddim", callback=cb)
        if step_times is not None:
            marks = [t0] + stamps
            step_times.extend(b - a for a, b in zip(marks, marks[1:]))

    return job, rt.deactivate


def _probe_spec(m: "Model", what: str, backend: str, threads: int, steps: int) -> dict:
    return {"name": m.name, "onnx_dir": str(m.onnx_dir) if m.onnx_dir else None,
            "pipeline_dir": str(m.pipeline_dir) if m.pipeline_dir else None,
            "runtime_dir": str(m.runtime_dir) if m.runtime_dir else None, "manifest": m.manifest,
            "what": what, "backend": backend, "threads": threads, "steps": steps}


def probe_memory(spec: dict) -> dict:
    """In a fresh process (python -m tinyprune.bench.latency PROBE_JSON): load what the backend needs first (libraries; for
    torch the pipeline's weights), then the peak-RSS increase of activating and running the row's job once."""
    backend = spec["backend"]
    m = Model(spec["name"], Path(spec["onnx_dir"]) if spec["onnx_dir"] else None,
              Path(spec["pipeline_dir"]) if spec["pipeline_dir"] else None, spec["manifest"],
              Path(spec["runtime_dir"]) if spec["runtime_dir"] else None)
    if backend in ONNX_BACKENDS:
        from tinyprune.runtime.generate import ort_providers

        ort_providers()  # import onnxruntime before the baseline
        if backend == "trt":
            import tensorrt  # noqa: F401
    else:
        m.pipe()
    sync = _sync(backend)
    with PeakMemory(cuda=backend == "torch-cuda") as pm:
        if spec["what"] == "generation":
            job, close = generation_job(m, backend, spec["threads"], spec["steps"], sync)
        else:
            job, close = component_job(m, spec["what"], component_feed(spec["manifest"], spec["what"]), backend,
                                       spec["threads"])
        job()
        sync()
    close()
    return {"rss_mb": pm.rss_mb, "cuda_mb": pm.cuda_mb}


def _measure_memory(models, what: str, backend: str, threads: int, steps: int, enabled: bool) -> dict[str, dict]:
    """{model name: {"rss_mb", "cuda_mb"}}, each from its own subprocess, so that one row's freed memory is not
    reused by the next (in-process figures after the first would read near zero)."""
    import subprocess
    import sys

    mem = {}
    for m in models:
        if not enabled:
            mem[m.name] = {"rss_mb": None, "cuda_mb": None}
            continue
        spec = json.dumps(_probe_spec(m, what, backend, threads, steps))
        proc = subprocess.run([sys.executable, "-m", "tinyprune.bench.latency", spec], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"memory probe of {m.name} {what} failed: {last}")
        mem[m.name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return mem


def bench(bundle: str | Path, backend: str = "ort-cpu", warmup: int = 3, iters: int = 20, gen_iters: int = 3,
          steps: int = 20, threads: int = 0, compare: bool = False, dense: str | Path | None = None,
          model: str | None = None, target: str | None = None, generation: bool = True, memory: bool = True,
          log=lambda msg: None) -> dict:
    from tinyprune.ship.bundle import read_manifest
    from tinyprune.config import load_profile

    for name, v, lo in (("--warmup", warmup, 0), ("--iters", iters, 1), ("--gen-iters", gen_iters, 1),
                        ("--steps", steps, 1), ("--threads", threads, 0)):
        if v < lo:
            raise InputError(f"{name} must be >= {lo}, got {v}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_backend(backend)
    profile = load_profile(target or manifest["profile"])
    compare = compare or dense is not None
    if generation and not (bundle / "runtime" / "shapes.json").is_file():
        log("generation: not measured: this bundle has no runtime/ (made by a tinyprune before the runtime covered "
            "its family; re-export it); its components are timed one by one")
        generation = False

    with tempfile.TemporaryDirectory(prefix="tinyprune-bench-") as tmp:
        models = [Model("pruned", bundle, bundle / "pruned", manifest)]
        if compare:
            if dense is not None:
                dense = Path(dense)
                dm = read_manifest(dense)
                if dm["source"]["sha256"] != manifest["source"]["sha256"]:
                    raise InputError(f"{dense} was not made from the same source pipeline as {bundle}")
                models.insert(0, Model("dense", dense, dense / "pruned", dm))
            else:
                src = _source_dir(manifest, bundle, model)
                if backend in ONNX_BACKENDS:
                    if backend == "trt":
                        raise InputError("--compare with trt needs --dense DENSE_BUNDLE with built engines")
                    dm = _export_dense(src, manifest, profile, Path(tmp), log)
                    models.insert(0, Model("dense", Path(tmp), src, dm))
                else:
                    from tinyprune.ship.runtime_files import write_runtime_dir

                    dm = Model("dense", None, src, manifest, runtime_dir=Path(tmp))
                    write_runtime_dir(dm.pipe(), Path(tmp))
                    models.insert(0, dm)
        if backend not in ONNX_BACKENDS:
            for m in models:  # weights loaded before measuring: torch rows' memory is what running adds
                m.pipe()
        sync = _sync(backend)
        rows = []

        for comp in _components(manifest):
            feed = component_feed(manifest, comp)
            shape = "x".join(map(str, feed[_primary(feed)].shape))
            log(f"{comp}: {backend}, shape {shape}, {warmup} warm-up + {iters} iterations" +
                (" (dense and pruned interleaved)" if compare else ""))

            mem = _measure_memory(models, comp, backend, threads, steps, memory)
            opened = {m.name: component_job(m, comp, feed, backend, threads) for m in models}
            try:
                times = interleaved({n: job for n, (job, _) in opened.items()}, warmup, iters, sync)
            finally:
                for _, close in opened.values():
                    close()
            for m in models:
                rows.append({"model": m.name, "what": comp, "shape": shape, **stats_ms(times[m.name]),
                             "peak_rss_mb": mem[m.name]["rss_mb"], "cuda_peak_mb": mem[m.name]["cuda_mb"]})

        if generation:
            log(f"generation: {steps} steps x UNet + VAE decode, 1 image, {gen_iters} iterations")
            step_times = {m.name: [] for m in models}
            mem = _measure_memory(models, "generation", backend, threads, steps, memory)
            opened = {m.name: generation_job(m, backend, threads, steps, sync, step_times[m.name]) for m in models}
            try:
                times = interleaved({n: job for n, (job, _) in opened.items()}, min(warmup, 1), gen_iters, sync)
            finally:
                for _, close in opened.values():
                    close()
            for m in models:
                st = step_times[m.name][-gen_iters * steps:]  # the timed runs, not the warm-up
                rows.append({"model": m.name, "what": "generation", "shape": f"1 image, {steps} steps",
                             **stats_ms(times[m.name]), "peak_rss_mb": mem[m.name]["rss_mb"],
                             "cuda_peak_mb": mem[m.name]["cuda_mb"]})
                rows.append({"model": m.name, "what": "generation step", "shape": "UNet x2 CFG + step",
                             **stats_ms(st), "peak_rss_mb": None, "cuda_peak_mb": None})

    speedup = {}
    if compare:
        for r in rows:
            if r["model"] == "pruned":
                d = next(x for x in rows if x["model"] == "dense" and x["what"] == r["what"])
                speedup[r["what"]] = round(d["p50_ms"] / r["p50_ms"], 3) if r["p50_ms"] else None
    from tinyprune.judge.checks import CheckOptions, Checks

    checks = Checks(CheckOptions(profile), log=log)
    checks.latency(rows)  # the profile's budgets (judge/checks.py)
    checked = checks.done()
    result = {
        "bundle": str(bundle), "backend": backend, "profile": profile.name,
        "machine": {"cpu": cpu_name(), "cores": cores(), "python": platform.python_version(),
                    "threads": threads or "default"},
        "warmup": warmup, "iters": iters, "gen_iters": gen_iters, "steps": steps,
        "models": [m.name for m in models], "rows": rows, "speedup_p50": speedup, **checked.to_dict(),
    }
    if not checked:
        raise GateFailed(f"latency over budget of profile {profile.name}: {'; '.join(checked.verdict.failed)} "
                         "(--target picks the profile of the machine you bench on)", result)
    return result


if __name__ == "__main__":  # the memory probe's child process
    import sys

    print(json.dumps(probe_memory(json.loads(sys.argv[1]))))
