"""Structured pruning (pattern "channel"): score groups -> allocate -> remove -> (distill) -> plan.

Methods, each an importance function over model/structure.py's find_groups():
  diff-pruning  importance/taylor_timestep.py  Taylor |w dL/dw| over timesteps up to L_t/L_max < T
  ld-pruner     importance/latent_stats.py     change of the output latent's mean and variance
  ecodiff       importance/hard_concrete.py    hard-concrete gates + L0 trained over the trajectory

The UNet is changed in place and physically smaller afterwards; the plan records what went and the new
shapes (also kept on the model as `unet.tinyprune_structure`, written to unet/structure.json on save and
used by pipeline.load_pipeline to rebuild the shapes before loading the safetensors weights).

Latency targets (--speedup, --latency-budget-ms): the allocation keeps at most the dense UNet's cost-table time
divided by the speed-up (or the budget), predicted from the table (measured onnxruntime time) or from MACs (GPU
targets, and a UNet past config.LARGE_UNET_BYTES anywhere: profiling it would hold its weights twice); with the
measured table the pruned UNet is then timed against the dense one on onnxruntime here, interleaved, and the plan
holds both figures.

With an engine on a GPU the UNet goes there for the scoring and the distillation only; MAC counts, cost tables,
allocation and surgery are bookkeeping on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from tinyprune.config import large_unet
from tinyprune.errors import InputError
from tinyprune.prune.structured.allocation import Target, align_channels, allocate, reachable
from tinyprune.prune.structured.cost import (count_macs, export_unet_onnx, measured_speedup, ort_cost_table,
                                             read_cached, token_counts, unit_macs, write_cached)
from tinyprune.model.families import move_cond
from tinyprune.model.structure import find_groups
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.plan import STRUCTURED_PATTERN, PrunePlan, StructuredComponent
from tinyprune.prune.structured.groups import prunable_params
from tinyprune.prune.structured.surgery import collapse_single_token_attention, remove_units
from tinyprune.runtime.measure import page_out_weights

STRUCTURED_METHODS = ("diff-pruning", "ld-pruner", "ecodiff")


def score(method: str, unet, groups, batches, *, pipe, seed: int = 0, log=lambda msg: None, info=None,
          options: dict | None = None, engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """Importance per unit of every group, by the named method (the plain functions of importance/)."""
    options = dict(options or {})
    if method == "diff-pruning":
        from tinyprune.prune.importance.taylor_timestep import taylor_timestep

        return taylor_timestep(unet, groups, batches, scheduler=pipe.noise_scheduler, log=log, info=info,
                               engine=engine, **options)
    if method == "ld-pruner":
        from tinyprune.prune.importance.latent_stats import latent_stats

        return latent_stats(unet, groups, batches, log=log, info=info, engine=engine, **options)
    if method == "ecodiff":
        from tinyprune.prune.importance.hard_concrete import hard_concrete

        def null_condition(n: int):
            with torch.no_grad():
                return move_cond(pipe.family.null_condition(n), engine.device)

        return hard_concrete(unet, groups, batches, scheduler=pipe.noise_scheduler, null_condition=null_condition,
                             seed=seed, log=log, info=info, engine=engine, **options)
    raise ValueError(f"unknown structured method {method!r}")


def unit_costs(unet, groups, *, latency_aware: bool, cost_model: str, cond, log) -> tuple[dict, str, object]:
    """Per-unit cost for the allocation's priority, what it is, and the measured cost table (or None)."""
    if not latency_aware:
        return None, "parameters", None
    if cost_model == "ort" and large_unet(unet):
        log("latency-aware: by MACs, not a measured onnxruntime table: profiling a UNet this large would hold its "
            "weights twice (onnxruntime's copy beside PyTorch's) and take minutes a call")
    elif cost_model == "ort":
        try:
            table = ort_cost_table(unet, groups, cond)
            if table.total_ms > 0:
                how = "read from the cache" if table.source == "cache" else "measured"
                log(f"latency-aware: onnxruntime cost table {how}"
                    f" for the dense UNet ({sum(table.groups.values()):.2f} of {table.total_ms:.2f} ms in "
                    f"{len(table.groups)} groups)")
                return {g.path: max(table.groups[g.path], 1e-6) / g.units for g in groups}, "onnxruntime ms", table
        except ImportError:
            log("latency-aware: onnxruntime is missing; weighing groups by MACs instead")
    macs = unit_macs(unet, groups, token_counts(unet, groups, cond))
    return macs, "MACs", None


def latency_target(st, groups, costs, table, macs_now: float) -> tuple[Target, dict]:
    """The allocation's Target for --speedup / --latency-budget-ms and what the plan records of it; one line
    (InputError) when the groups' time cannot reach it."""
    if table is None:  # MACs: the stated model of a GPU target (or of a UNet too large to profile here)
        keep = macs_now / st.speedup
        return Target("macs", keep), {"kind": "speedup", "speedup": st.speedup, "cost_model": "MACs"}
    total = table.total_ms
    keep = total / st.speedup if st.speedup is not None else st.latency_budget_ms
    most = reachable(groups, costs)
    if st.speedup is not None and total - keep > most:  # a budget is wall time, checked once timed
        what = f"--speedup {st.speedup:g}" if st.speedup is not None else f"--latency-budget-ms {keep:g}"
        raise InputError(f"{what} is out of reach: the prunable groups own {most:.2f} of the UNet's {total:.2f} ms "
                         f"measured here, so at most {total / (total - most):.2f}x")
    return Target("latency", keep), {"kind": "speedup" if st.speedup is not None else "latency_budget_ms",
                                     "speedup": st.speedup, "budget_ms": st.latency_budget_ms,
                                     "cost_model": "onnxruntime ms", "dense_ms": round(total, 4)}


MEASURE_ROUNDS = 5  # allocations timed against the dense UNet before a latency target settles
MEASURE_SLACK = 0.02  # a measured speed-up within 2 % of the asked one meets it: the interleaved p50's noise here
MEASURE_CLOSE = 0.10  # ... and one at most 10 % past it ends the search (more removed costs quality)


def to_measured_speed(unet, groups, cond, table, costs, target, speed: dict, allocation, log, key: str) -> dict:
    """Kept units for a latency target on the measured cost table, the allocation checked by timing: the cost
    table predicts (its per-node profile overstates the many small operators), so each round prunes a copy,
    times it against the dense UNet on onnxruntime here, interleaved, and asks the next allocation for more (the
    shortfall's ratio, then between the closest rounds short of and past the target), until one lands within
    MEASURE_CLOSE past it or MEASURE_ROUNDS rounds are spent; of the rounds that meet the target the least fast is
    kept (the least removed), else the fastest. `speed` receives the figures. The rounds are cached under `key`
    (rounds_key): the same command allocates the same units again without timing anything, and its plan shows the
    figures measured for that allocation."""
    cached = read_cached("speedup_rounds", key)
    if cached is not None:
        log(f"unet: latency target: the allocation's timed rounds read from the cache ({len(cached['rounds'])})")
        speed.update(cached)
        best = next(x for x in cached["rounds"] if x["asked"] == cached["chosen"])
        return allocation(Target("latency", table.total_ms / best["asked"]))
    want = speed["speedup"] or table.total_ms / target.amount  # a budget: the dense p50's ratio, once timed
    most = table.total_ms - reachable(groups, costs)
    top = table.total_ms / max(most, 1e-9)  # the most the table can be asked for: every removable unit gone
    rounds, ask, short, over = [], want, None, None
    with tempfile.TemporaryDirectory() as tmp:
        feed = export_unet_onnx(unet, cond, Path(tmp) / "dense.onnx", table.batch)
        for r in range(MEASURE_ROUNDS):
            keep = allocation(Target("latency", table.total_ms / ask))
            trial = copy.deepcopy(unet)
            remove_units(trial, keep, groups)
            export_unet_onnx(trial, cond, Path(tmp) / "pruned.onnx", table.batch)
            del trial
            m = measured_speedup(Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx", feed, threads=table.threads)
            if speed["speedup"] is None and r == 0:
                want = max(m["dense_p50_ms"] / speed["budget_ms"], 1.0)
            removed = sum((g.units - len(keep[g.path])) * costs[g.path] for g in groups)
            rounds.append({"asked": ask, "predicted": round(table.total_ms / (table.total_ms - removed), 3),
                           "measured": m})
            log(f"unet: round {r + 1}: allocated for {ask:.2f}x on the cost table, measured {m['speedup']:.2f}x "
                f"on onnxruntime CPU here (p50 {m['p50_ms']:.1f} vs {m['dense_p50_ms']:.1f} ms)")
            got = m["speedup"]
            if want * (1 - MEASURE_SLACK) <= got <= want * (1 + MEASURE_CLOSE):
                break
            if got < want:
                short = (ask, got) if short is None or ask > short[0] else short
            else:
                over = (ask, got) if over is None or ask < over[0] else over
            if short and over:  # between the two: log-linear in the measured speed-up
                f = (math.log(want) - math.log(short[1])) / max(math.log(over[1]) - math.log(short[1]), 1e-9)
                ask = short[0] * (over[0] / short[0]) ** min(max(f, 0.1), 0.9)
            else:
                ask = min(ask * want / max(got, 1e-3), top)
            if short and short[0] >= top * (1 - 1e-9):
                break  # everything removable is gone and it is still short
    met = [x for x in rounds if x["measured"]["speedup"] >= want * (1 - MEASURE_SLACK)]
    best = (min(met, key=lambda x: x["measured"]["speedup"]) if met
            else max(rounds, key=lambda x: x["measured"]["speedup"]))
    figures = {"predicted_speedup": best["predicted"], "measured": best["measured"], "met": bool(met),
               "wanted": round(want, 3), "chosen": best["asked"], "rounds": rounds}
    write_cached("speedup_rounds", key, figures)
    speed.update(figures)
    if not met:
        log(f"unet: the latency target ({want:.2f}x) is not reached: {best['measured']['speedup']:.2f}x measured at "
            f"best (the groups own {table.total_ms - most:.2f} of {table.total_ms:.2f} ms on the cost table)")
    return allocation(Target("latency", table.total_ms / best["asked"]))


def rounds_key(table, spec, groups, scores: dict) -> str:
    """The cache key of a latency target's timed rounds: what decides the allocations they timed (the allocation's
    own code included: another version allocates other units for the same ask)."""
    import inspect

    from tinyprune.prune.structured import allocation as rule

    code = hashlib.sha256((inspect.getsource(rule) + inspect.getsource(to_measured_speed)).encode()).hexdigest()
    shape = [(g.path, g.units, g.removable) for g in groups]
    h = hashlib.sha256(json.dumps([code, shape, table.key, spec.method, spec.scope, spec.structured.normalize,
                                   spec.structured.speedup, spec.structured.latency_budget_ms, MEASURE_ROUNDS,
                                   MEASURE_SLACK, MEASURE_CLOSE]).encode())
    for path in sorted(scores):
        h.update(path.encode())
        h.update(scores[path].detach().double().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def prune_structured(pipe, spec, batches, log=lambda msg: None, score_options: dict | None = None,
                     scores: dict | None = None, engine: Engine = LOCAL) -> PrunePlan:
    """Prune pipe.unet in place to spec.sparsity (or spec.structured.target_macs); returns the plan.
    `scores`: a dict to reuse -- empty, it receives this run's scores (and their info); filled by an
    earlier run of the same method on the same model and batches, the scoring is skipped."""
    st = spec.structured
    unet = pipe.unet
    if st.latency_budget_ms is not None and large_unet(unet):
        raise InputError("--latency-budget-ms is measured onnxruntime time, which a UNet this large is not timed by "
                         "here (a second copy of its weights); use --speedup (on its MACs) or --sparsity")
    t0 = time.monotonic()
    torch.manual_seed(spec.seed)
    context_tokens = pipe.family.context_tokens
    with torch.no_grad():
        cond = pipe.family.example_condition(1)  # one sample's conditioning for MAC counts and cost tables
    params_dense = prunable_params(unet)
    macs_dense = count_macs(unet, cond)
    from tinyprune.prune.recovery import distill, lean_distillation, record_teacher

    lean = spec.recovery_steps > 0 and lean_distillation(unet, engine)  # the teacher's outputs recorded instead
    teacher = copy.deepcopy(unet).eval().requires_grad_(False) if spec.recovery_steps > 0 and not lean else None
    if st.target_macs is not None:
        target = Target("macs", st.target_macs * macs_dense)
    else:
        target = Target("params", spec.sparsity * params_dense)

    collapsed = []
    if context_tokens == 1:  # exact: one context token makes queries and keys irrelevant
        trial = copy.deepcopy(unet)
        paths = collapse_single_token_attention(trial)
        gone = params_dense - prunable_params(trial)
        if paths and (target.kind == "macs" or gone <= target.amount):
            collapsed = collapse_single_token_attention(unet)
            log(f"{len(collapsed)} single-token cross-attentions reduced to to_v/to_out (exact): {gone} parameters")
        del trial
    groups = find_groups(unet)
    if scores and scores.get("method") == spec.method:
        info, unit_scores = scores["info"], scores["scores"]
    else:
        info = {}
        with engine.hosting(unet):
            unit_scores = score(spec.method, unet, groups, batches, pipe=pipe, seed=spec.seed, log=log, info=info,
                                options=score_options, engine=engine)
        unit_scores = {path: s.cpu() for path, s in unit_scores.items()}
        if scores is not None:
            scores.update(method=spec.method, info=info, scores=unit_scores)
    costs, cost_kind, table = engine.from_main(lambda: unit_costs(unet, groups, latency_aware=bool(st.latency_aware),
                                                                  cost_model=st.cost_model or "ort", cond=cond, log=log))
    macs_now = count_macs(unet, cond)
    speed = None
    if st.latency_target:
        target, speed = latency_target(st, groups, costs, table, macs_now)
    macs = unit_macs(unet, groups, token_counts(unet, groups, cond)) if target.kind == "macs" else None

    def allocation(target):
        keep = allocate(groups, unit_scores, target, costs=costs, macs=macs, scope=spec.scope, normalize=st.normalize,
                        removed_before=params_dense - prunable_params(unet),
                        macs_total=macs_now if target.kind == "macs" else None,
                        latency_total=table.total_ms if table is not None else None)
        return align_channels(groups, unit_scores, keep, st.channel_multiple)

    if target.kind == "latency":
        def timed():
            return to_measured_speed(unet, groups, cond, table, costs, target, speed, allocation, log,
                                     rounds_key(table, spec, groups, unit_scores)), speed

        keep, speed = engine.from_main(timed)
    else:
        keep = allocation(target)
    if lean:  # the dense UNet's last moment: its outputs, for the distillation after surgery
        with engine.hosting(unet):
            teacher = record_teacher(unet.eval(), batches, scheduler=pipe.noise_scheduler, steps=spec.recovery_steps,
                                     minutes=st.recovery_minutes, seed=spec.seed, log=log)
    # each group's dense weights, mapped from the file still, stop counting once replaced: at SD-1.5 size the whole
    # dense UNet resident beside the student peaked at 1.9x its weights
    structure = remove_units(unet, keep, groups, after_each=lambda: page_out_weights(lambda path: "/unet/" in path))
    params, macs_after = prunable_params(unet), count_macs(unet, cond)
    if speed is not None and target.kind == "macs":
        speed["predicted_speedup"] = round(macs_now / macs_after, 3)
        log(f"unet: predicted speed-up {speed['predicted_speedup']:.2f}x (MACs; not measured: "
            + ("the target's GPU is not here)" if st.cost_model == "macs" else "this UNet is not timed here)"))
    whole = [p for p, e in structure["groups"].items() if e.get("channels", e.get("heads", e.get("inner"))) == 0]
    log(f"unet: {spec.method}: {params_dense} -> {params} prunable parameters "
        f"({1 - params / params_dense:.4f} removed), MACs {macs_dense / 1e6:.1f}M -> {macs_after / 1e6:.1f}M, "
        f"{len(whole)} groups removed whole")
    recovery = None
    if teacher is not None:
        with engine.hosting(unet, *([] if lean else [teacher])):
            recovery = distill(unet, teacher, batches, scheduler=pipe.noise_scheduler, steps=spec.recovery_steps,
                               minutes=st.recovery_minutes, seed=spec.seed, log=log, engine=engine)
        del teacher
    entry = StructuredComponent(
        sparsity=1 - params / params_dense,  # the fraction of prunable parameters removed
        params_dense=params_dense, params=params, params_removed=round(1 - params / params_dense, 6),
        macs_dense=macs_dense, macs=macs_after,
        target={"kind": target.kind, "amount": round(target.amount, 4 if target.kind == "latency" else 1),
                **({"speedup": speed} if speed else {})},
        allocation={"scope": spec.scope, "normalize": st.normalize, "cost": cost_kind,
                    "channel_multiple": st.channel_multiple,
                    **({"cost_table": table.to_dict()} if table is not None else {})},
        collapsed_single_token_attention=collapsed,
        groups={g.path: {"kind": g.kind, "units": g.units, "kept": len(keep[g.path]),
                         "removed": g.units - len(keep[g.path])} for g in groups},
        structure=structure,
        scores={"method": spec.method, **info},
        removed_whole=whole,
        recovery=recovery,
        seconds=round(time.monotonic() - t0, 1),
    )
    return PrunePlan(spec.method, STRUCTURED_PATTERN, spec.scope, spec.sparsity, {"unet": entry})
