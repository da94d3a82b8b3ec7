"""Structured pruning (pattern "channel"): score groups -> allocate -> remove -> (distill) -> plan.

Methods, each an importance function over model/structure.py's find_groups():
  diff-pruning  importance/taylor_timestep.py  Taylor |w dL/dw| over timesteps up to L_t/L_max < T
  ld-pruner     importance/latent_stats.py     change of the output latent's mean and variance
  ecodiff       importance/hard_concrete.py    hard-concrete gates + L0 trained over the trajectory

The UNet is changed in place and physically smaller afterwards; the plan records what went and the new
shapes (also kept on the model as `unet.tinyprune_structure`, written to unet/structure.json on save and
used by pipeline.load_pipeline to rebuild the shapes before loading the safetensors weights).

With an engine on a GPU the UNet goes there for the scoring and the distillation only; MAC counts, cost tables,
allocation and surgery are bookkeeping on the CPU.
"""

from __future__ import annotations

import copy
import time

import torch

from tinyprune.prune.structured.allocation import Target, allocate

from tinyprune.prune.structured.cost import count_macs, ort_cost_table, token_counts, unit_macs
from tinyprune.model.families import move_cond
from tinyprune.model.structure import find_groups
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.plan import STRUCTURED_PATTERN, PrunePlan, StructuredComponent
from tinyprune.prune.structured.groups import prunable_params
from tinyprune.prune.structured.surgery import collapse_single_token_attention, remove_units

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


def unit_costs(unet, groups, *, latency_aware: bool, cost_model: str, cond, log) -> tuple[dict, str]:
    """Per-unit cost for the allocation's priority, and what it is."""
    if not latency_aware:
        return None, "parameters"
    if cost_model == "ort":
        try:
            table = ort_cost_table(unet, groups, cond)
            if sum(table.values()) > 0:
                log("latency-aware: onnxruntime cost table measured on the dense UNet "
                    f"({sum(table.values()):.2f} ms in {len(table)} groups)")
                return {g.path: max(table[g.path], 1e-6) / g.units for g in groups}, "onnxruntime ms"
        except ImportError:
            log("latency-aware: onnxruntime is missing; weighing groups by MACs instead")
    macs = unit_macs(unet, groups, token_counts(unet, groups, cond))
    return macs, "MACs"


def prune_structured(pipe, spec, batches, log=lambda msg: None, score_options: dict | None = None,
                     scores: dict | None = None, engine: Engine = LOCAL) -> PrunePlan:
    """Prune pipe.unet in place to spec.sparsity (or spec.structured.target_macs); returns the plan.
    `scores`: a dict to reuse -- empty, it receives this run's scores (and their info); filled by an
    earlier run of the same method on the same model and batches, the scoring is skipped."""
    st = spec.structured
    unet = pipe.unet
    t0 = time.monotonic()
    torch.manual_seed(spec.seed)
    context_tokens = pipe.family.context_tokens
    with torch.no_grad():
        cond = pipe.family.example_condition(1)  # one sample's conditioning for MAC counts and cost tables
    params_dense = prunable_params(unet)
    macs_dense = count_macs(unet, cond)
    teacher = copy.deepcopy(unet).eval().requires_grad_(False) if spec.recovery_steps > 0 else None
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
    costs, cost_kind = unit_costs(unet, groups, latency_aware=st.latency_aware, cost_model=st.cost_model,
                                  cond=cond, log=log)
    macs = unit_macs(unet, groups, token_counts(unet, groups, cond)) if target.kind == "macs" else None
    keep = allocate(groups, unit_scores, target, costs=costs, macs=macs, scope=spec.scope, normalize=st.normalize,
                    removed_before=params_dense - prunable_params(unet),
                    macs_total=count_macs(unet, cond) if target.kind == "macs" else None)
    structure = remove_units(unet, keep, groups)
    params, macs_after = prunable_params(unet), count_macs(unet, cond)
    whole = [p for p, e in structure["groups"].items() if e.get("channels", e.get("heads", e.get("inner"))) == 0]
    log(f"unet: {spec.method}: {params_dense} -> {params} prunable parameters "
        f"({1 - params / params_dense:.4f} removed), MACs {macs_dense / 1e6:.1f}M -> {macs_after / 1e6:.1f}M, "
        f"{len(whole)} groups removed whole")
    recovery = None
    if teacher is not None:
        from tinyprune.prune.recovery import distill

        with engine.hosting(unet, teacher):
            recovery = distill(unet, teacher, batches, scheduler=pipe.noise_scheduler, steps=spec.recovery_steps,
                               minutes=st.recovery_minutes, seed=spec.seed, log=log, engine=engine)
        del teacher
    entry = StructuredComponent(
        sparsity=1 - params / params_dense,  # the fraction of prunable parameters removed
        params_dense=params_dense, params=params, params_removed=round(1 - params / params_dense, 6),
        macs_dense=macs_dense, macs=macs_after,
        target={"kind": target.kind, "amount": round(target.amount, 1)},
        allocation={"scope": spec.scope, "normalize": st.normalize, "cost": cost_kind},
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
