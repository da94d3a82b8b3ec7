"""Structured pruning on the demo pipeline: onnxruntime CPU latency against dense, FD and accuracy.

For each method (diff-pruning, ld-pruner, ecodiff; with and without --latency-aware) at the same fraction of
prunable parameters removed (default 0.43), from the same calibration batches:
  * the pruned UNet is exported to ONNX (TorchScript exporter, opset 17, plain attention, batch 2 = CFG,
    the native latent size: what `tinyprune export` ships) and timed on onnxruntime CPU against the dense
    UNet's export in one run, interleaved (every round runs every model once, in rotating order, so that a
    noisy shared machine slows all alike); the figure is the ratio of medians, dense / pruned;
  * FD and class accuracy (tinyprune.judge.quality.evaluate: the shipped digit classifier and held-out digits) of
    the pruned pipeline before and after recovery (distillation from the dense UNet, --recovery-steps).
Baselines beside them:
  * "uniform inner" -- every group loses the same fraction of its units, ranked by weight magnitude
    (the structured machinery with scope "layer" and a magnitude score): uniform width scaling that keeps
    the trained weights, so its quality is measured too;
  * "uniform blocks" -- UNet2DConditionModel built with every block width scaled (residual stream too) to
    the same parameter fraction, random weights: the ../shared/DESIGN.md measurement (latency only, it is untrained).

Run (two threads, as the CPU targets):
    python benchmarks/structured.py --out benchmarks/results/structured.json [--tiny] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny pipeline (--tiny, --random-demo)

from tinyprune.prune.structured.cost import count_macs  # noqa: E402
from tinyprune.model.families.base import UNetModule  # noqa: E402
from tinyprune.model.structure import find_groups  # noqa: E402
from tinyprune.prune.structured.groups import prunable_params, unit_sums
from tinyprune.prune.structured.surgery import remove_units


def export_unet(unet, path: Path, batch: int = 2, tokens: int = 1) -> None:
    """The UNet as `tinyprune export` writes it: plain attention, opset 17, TorchScript exporter."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = copy.deepcopy(unet).eval()
    unet.set_attn_processor(AttnProcessor())
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    args = (torch.randn(batch, unet.config.in_channels, size, size), torch.full((batch,), 500.0),
            torch.randn(batch, tokens, unet.config.cross_attention_dim))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(UNetModule(unet), args, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["out_sample"], opset_version=17, do_constant_folding=True, dynamo=False)


def interleaved_latency(paths: dict[str, Path], feed: dict, rounds: int = 30, iters: int = 5,
                        threads: int = 2) -> dict[str, dict]:
    """Median ms per call of each model; all models run in every round, order rotating."""
    import onnxruntime as ort

    sessions = {}
    for name, p in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        s = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        sessions[name] = (s, {i.name: feed[i.name] for i in s.get_inputs()})
    for s, f in sessions.values():
        for _ in range(5):
            s.run(None, f)
    names = list(sessions)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s, f = sessions[n]
            t0 = time.perf_counter()
            for _ in range(iters):
                s.run(None, f)
            times[n].append((time.perf_counter() - t0) / iters * 1000)
    return {n: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)),
                "nodes": _nodes(paths[n])} for n, v in times.items()}


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def uniform_blocks_unet(unet, keep: float):
    """The dense UNet's config with every block width scaled so prunable parameters ~= keep (random weights)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    groups = 8  # widths in steps of 8 (norm_num_groups 8): the scaling can come close to the fraction
    cfg["norm_num_groups"] = groups
    base = list(cfg["block_out_channels"])
    best = None
    for step in range(1, 200):
        f = step / 200
        widths = [max(groups, int(round(c * f / groups)) * groups) for c in base]
        heads = cfg["attention_head_dim"]
        if any(w % (heads if isinstance(heads, int) else heads[0]) for w in widths):
            continue
        model = UNet2DConditionModel.from_config({**cfg, "block_out_channels": tuple(widths)})
        ratio = prunable_params(model) / prunable_params(unet)
        if best is None or abs(ratio - keep) < abs(best[0] - keep):
            best = (ratio, model, widths)
    return best


def cached_batches(pipe, cache: Path | None):
    """calibration_batches (data-free), the clean latents kept as safetensors in `cache` between runs."""
    from safetensors.torch import load_file, save_file

    from tinyprune.model.calibration import CalibrationSet, from_samples

    f = cache / "calibration.safetensors" if cache else None
    if f is not None and f.is_file():
        t = load_file(str(f))
        cal = CalibrationSet(t["latents"], t["labels"].tolist(), "samples")
    else:
        cal = from_samples(pipe, seed=0)
        if f is not None:
            cache.mkdir(parents=True, exist_ok=True)
            save_file({"latents": cal.latents.contiguous(), "labels": torch.tensor(cal.conditions)}, str(f))
    return cal.batches(pipe, batch_size=16, seed=0)


def magnitude_scores(unet, groups):
    return {g.path: unit_sums(unet, g, lambda p: p.abs()).float() for g in groups}


def quality(pipe, n_per_class: int, steps: int) -> dict:
    from tinyprune.judge.quality import evaluate

    r = evaluate(pipe, None, n_per_class=n_per_class, steps=steps)
    return {"fd": round(r["dense"]["fd"], 3), "accuracy": round(r["dense"]["accuracy"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "structured.json")
    ap.add_argument("--tiny", action="store_true", help="tiny random pipeline instead of the demo (no quality)")
    ap.add_argument("--random-demo", action="store_true", help="the demo's UNet architecture, random weights "
                    "(latency only; for when the demo pipeline is not trained yet)")
    ap.add_argument("--sparsity", type=float, default=0.43)
    ap.add_argument("--methods", default="diff-pruning,ld-pruner,ecodiff")
    ap.add_argument("--latency-aware", default="both", choices=("off", "on", "both"))
    ap.add_argument("--normalize", default="mean", choices=("mean", "none"))
    ap.add_argument("--recovery-steps", type=int, default=300)
    ap.add_argument("--recovery-minutes", type=float, default=None)
    ap.add_argument("--n-per-class", type=int, default=20, help="quality samples per class (0: skip quality)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the quality evaluation")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ecodiff-iterations", type=int, default=60)
    ap.add_argument("--cache", type=Path, default=None, help="dir to keep the calibration latents in "
                    "(safetensors) between runs")
    ap.add_argument("--no-collapse", action="store_true", help="skip the exact single-token attention collapse")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    from tinyprune.config import PruneSpec, StructuredSpec, load_profile
    from tinyprune.prune.recovery import distill
    from pipelines import tiny as tiny_pipeline
    from tinyprune.model.pipeline import demo_dir, load_pipeline
    from tinyprune.prune.structured.run import prune_structured

    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    if args.random_demo:
        from tinyprune.demo.train import RECIPE, build_unet

        dense = tiny_pipeline(seed=0, cross_dim=RECIPE["text"]["hidden_size"])
        torch.manual_seed(0)
        dense.unet = build_unet(RECIPE["unet"], RECIPE["text"]["hidden_size"]).eval().requires_grad_(False)
        model_name, args.n_per_class = "demo architecture (random weights)", 0
    elif args.tiny or not (demo_dir() / "model_index.json").is_file():
        if not args.tiny:
            log("demo pipeline not found; using the tiny random pipeline (no quality figures)")
        dense, model_name = tiny_pipeline(seed=0), "tiny (random weights)"
        args.n_per_class = 0
    else:
        dense, model_name = load_pipeline(demo_dir()), "demo"
    profile = load_profile("x86-cpu")
    log(f"{model_name}: {prunable_params(dense.unet)} prunable UNet parameters; calibration batches ...")
    batches = cached_batches(dense, args.cache)
    tokens = dense.family.context_tokens
    with torch.no_grad():
        cond1 = dense.family.example_condition(1)

    score_cache = {}  # one scoring per method, reused by its latency-aware variant
    variants = []
    for m in args.methods.split(","):
        for la in ((False, True) if args.latency_aware == "both" else (args.latency_aware == "on",)):
            variants.append((m + (" +latency" if la else ""), m, la))
    results = {}
    pruned_unets = {}
    dense_q = quality(dense, args.n_per_class, args.steps) if args.n_per_class else None
    if dense_q:
        log(f"dense: FD {dense_q['fd']}, accuracy {dense_q['accuracy']}")

    def finish(name, pipe, plan_entry, seconds):
        row = {"params_removed": plan_entry["params_removed"], "macs_ratio": plan_entry["macs"] / plan_entry["macs_dense"],
               "removed_whole": len(plan_entry.get("removed_whole", [])), "prune_seconds": round(seconds, 1)}
        if args.n_per_class:
            row["before"] = quality(pipe, args.n_per_class, args.steps)
            t0 = time.monotonic()
            row["recovery"] = distill(pipe.unet, dense.unet, batches, scheduler=pipe.scheduler,
                                      steps=args.recovery_steps, minutes=args.recovery_minutes, log=log)
            row["after"] = quality(pipe, args.n_per_class, args.steps)
            row["recovery"]["seconds"] = round(time.monotonic() - t0, 1)
            log(f"{name}: FD {row['before']['fd']} -> {row['after']['fd']}, accuracy {row['before']['accuracy']} -> "
                f"{row['after']['accuracy']}")
        results[name] = row
        pruned_unets[name] = copy.deepcopy(pipe.unet)

    for name, method, la in variants:
        pipe = copy.deepcopy(dense)
        spec, _ = PruneSpec.resolve(method, args.sparsity, "channel", "global", False, profile,
                                    structured=StructuredSpec.parse(latency_aware=la, normalize=args.normalize))
        opts = {"iterations": args.ecodiff_iterations} if method == "ecodiff" else None
        t0 = time.monotonic()
        if args.no_collapse:
            import tinyprune.prune.structured.run as st

            saved, st.collapse_single_token_attention = st.collapse_single_token_attention, lambda u: []
        try:
            plan = prune_structured(pipe, spec, batches, log=log, score_options=opts,
                                    scores=score_cache.setdefault(method, {}))
        finally:
            if args.no_collapse:
                st.collapse_single_token_attention = saved
        entry = plan.to_dict()["components"]["unet"]
        finish(name, pipe, entry, time.monotonic() - t0)
        results[name]["whole"] = entry.get("removed_whole", [])
        results[name]["groups"] = {p: g["kept"] for p, g in entry["groups"].items()}

    # baseline 1: uniform inner widths, magnitude-ranked (trained weights kept)
    from tinyprune.prune.structured.allocation import Target, allocate

    pipe = copy.deepcopy(dense)
    groups = find_groups(pipe.unet)
    p0 = prunable_params(pipe.unet)
    keep = allocate(groups, magnitude_scores(pipe.unet, groups), Target("params", args.sparsity * p0), scope="layer")
    for g in groups:  # uniform means no group vanishes: keep at least one unit
        if len(keep[g.path]) == 0:
            keep[g.path] = magnitude_scores(pipe.unet, [g])[g.path].argmax().view(1)
    remove_units(pipe.unet, keep, groups)
    finish("uniform inner", pipe, {"params_removed": round(1 - prunable_params(pipe.unet) / p0, 6),
                                   "macs": count_macs(pipe.unet, cond1), "macs_dense": count_macs(dense.unet, cond1)}, 0)
    # baseline 2: uniform block widths (random weights; latency only)
    ratio, ublocks, widths = uniform_blocks_unet(dense.unet, 1 - args.sparsity)
    results[f"uniform blocks {tuple(widths)}"] = {"params_removed": round(1 - ratio, 6),
                                                  "macs_ratio": count_macs(ublocks, cond1) / count_macs(dense.unet, cond1)}
    pruned_unets[f"uniform blocks {tuple(widths)}"] = ublocks

    log("exporting and timing on onnxruntime CPU (interleaved) ...")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        export_unet(dense.unet, paths["dense"], tokens=tokens)
        for i, (name, u) in enumerate(pruned_unets.items()):
            paths[name] = Path(tmp) / f"v{i}.onnx"
            export_unet(u, paths[name], tokens=tokens)
        size = dense.latent_size
        rng = np.random.default_rng(0)
        feed = {"sample": rng.standard_normal((2, dense.latent_channels, size, size)).astype(np.float32),
                "timestep": np.array([500.0, 500.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, tokens, dense.unet.config.cross_attention_dim)).astype(np.float32)}
        lat = interleaved_latency(paths, feed, rounds=args.rounds)
    d = lat["dense"]["median_ms"]
    for name, row in results.items():
        row["latency_ms"] = round(lat[name]["median_ms"], 3)
        row["speedup"] = round(d / lat[name]["median_ms"], 3)
        row["onnx_nodes"] = lat[name]["nodes"]
    report = {"model": model_name, "sparsity": args.sparsity, "normalize": args.normalize,
              "recovery_steps": args.recovery_steps, "n_per_class": args.n_per_class, "steps": args.steps,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "onnxruntime_threads": 2, "torch": torch.__version__},
              "dense": {"latency_ms": round(d, 3), "onnx_nodes": lat["dense"]["nodes"], "quality": dense_q,
                        "params": prunable_params(dense.unet)},
              "variants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(r: dict) -> str:
    q = r["dense"]["quality"]
    lines = [f"model {r['model']}, {r['sparsity']:.0%} of prunable parameters removed, onnxruntime CPU 2 threads, "
             f"batch 2; dense {r['dense']['latency_ms']:.2f} ms/UNet call, {r['dense']['onnx_nodes']} nodes"
             + (f"; dense FD {q['fd']}, accuracy {q['accuracy']}" if q else ""), "",
             "| variant | params removed | MACs kept | ONNX nodes | ms | speed-up | FD before | acc before | FD after | acc after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        b, a = v.get("before", {}), v.get("after", {})
        lines.append(f"| {name} | {v['params_removed']:.3f} | {v['macs_ratio']:.2f} | {v['onnx_nodes']} | "
                     f"{v['latency_ms']:.2f} | {v['speedup']:.2f}x | {b.get('fd', '-')} | {b.get('accuracy', '-')} | "
                     f"{a.get('fd', '-')} | {a.get('accuracy', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
