"""Which units of which groups go: scores + costs -> kept unit indices, to a parameter or MAC target.

Targets. `sparsity` is the fraction of the UNet's prunable parameters (Conv2d + Linear weight elements,
the count masks.prunable_weights sums) that must be gone; `target_macs` is the fraction of the dense
UNet's multiply-accumulates (per sample, at the native latent size) that may remain; a latency target
(--speedup on the measured cost table, --latency-budget-ms) is the UNet call's milliseconds that may remain,
each unit's removal saving its share of its group's measured time, the rest of the UNet's time (what no group
owns: embeddings, norms of the blocks' outputs, conv_in/out) staying. Parameters already
gone before allocation (the exact single-token attention collapse) count towards the target.

Global allocation (scope "global"): every unit has a score (higher = more important: the importance
function's estimate of the damage its removal does), a gain (what its removal counts towards the target:
parameters or MACs) and a cost (what its removal saves: the gain, or its latency when latency-aware).
Units go in increasing order of priority until the target is met, where by `normalize`
  "mean"  priority = score / mean score of its group * gain / cost -- Torch-Pruning's global pruning with
          its group normaliser: groups compete by relative importance, so the cut spreads over all groups;
          latency-aware, each group is weighted by how much time per parameter it saves;
  "none"  priority = score / cost -- a knapsack ratio on the raw scores, which for these methods are on
          one scale (a loss change, an output-statistics change, a gate probability): whole unimportant
          groups go first.
Within a group all units have the same gain and cost, so they go in score order, and a group can empty
completely (surgery.py then replaces it by one of model/structure.py's replacement modules).

Scope "layer": the same fraction of units in every group (Diff-Pruning's own uniform allocation),
the fraction found by bisection to meet the target.

Costs come from cost.py (parameters, MACs or measured onnxruntime time per unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinyprune.model.structure import Group


# --------------------------------------------------------------------------- allocation

@dataclass(frozen=True)
class Target:
    kind: str  # "params": remove at least `amount` parameters | "macs": keep at most `amount` MACs |
    # "latency": keep at most `amount` ms of the cost table's time
    amount: float


def _normalized(groups: list[Group], scores: dict[str, torch.Tensor], normalize: str) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        s = scores[g.path].detach().double().clamp_min(0)
        if normalize == "mean":
            s = s / s.mean().clamp_min(1e-30)
        out[g.path] = s
    return out


def allocate(groups: list[Group], scores: dict[str, torch.Tensor], target: Target, *,
             costs: dict[str, float] | None = None, macs: dict[str, float] | None = None,
             scope: str = "global", normalize: str = "mean", removed_before: float = 0.0,
             macs_total: float | None = None, latency_total: float | None = None) -> dict[str, torch.Tensor]:
    """Kept unit indices per group. `costs`: per-unit cost for the priority (default: parameters for a
    params target, MACs for a MACs target; a latency target's gain and cost are both its per-unit ms).
    `macs`: per-unit MACs (needed for a MACs target); `removed_before`: parameters already removed;
    `macs_total`: the current model's MACs; `latency_total`: the cost table's whole-UNet ms."""
    if target.kind == "macs" and (macs is None or macs_total is None):
        raise ValueError("a MACs target needs per-unit MACs and the model's total")
    if target.kind == "latency" and (costs is None or latency_total is None):
        raise ValueError("a latency target needs per-unit times and the model's total")
    if target.kind == "latency":
        gain = {g.path: float(costs[g.path]) for g in groups}
        need = latency_total - target.amount
    elif target.kind == "macs":
        gain = {g.path: float(macs[g.path]) for g in groups}
        need = macs_total - target.amount
    else:
        gain = {g.path: float(g.params_per_unit) for g in groups}
        need = target.amount - removed_before
    # a latency target is a knapsack on the raw scores (one scale for these methods: a loss change, a statistics
    # change, a gate probability) per ms saved: relative scores would make every group's mean unit equal and leave
    # the ranking across groups to their time alone, emptying the costliest groups (the cross-attentions, the
    # prompt's only way in) whatever their damage
    norm = _normalized(groups, scores, "none" if target.kind == "latency" else normalize)
    order = {g.path: torch.argsort(norm[g.path], stable=True) for g in groups}
    limit = {g.path: g.units if g.removable else g.units - 1 for g in groups}
    if need <= 0:
        return {g.path: torch.arange(g.units) for g in groups}
    if scope == "layer":
        counts = _uniform(groups, gain, limit, need, norm, order)
    else:
        cost = costs or gain
        cands = []
        for g in groups:
            c = max(float(cost[g.path]), 1e-30)
            # "mean": relative scores, each group weighted by what a unit saves per unit of cost (1 unless
            # latency-aware); "none", and any latency target: damage per unit of cost (a knapsack ratio)
            weight = gain[g.path] / c if normalize == "mean" and target.kind != "latency" else 1.0 / c
            for rank, u in enumerate(order[g.path][:limit[g.path]].tolist()):
                cands.append((float(norm[g.path][u]) * weight, g.path, rank))
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        counts, done, last = {g.path: 0 for g in groups}, 0.0, None
        for _, path, rank in cands:
            if done >= need:
                break
            # units of a group go in score order: a candidate is taken only after its group's lower ranks
            if rank != counts[path]:
                continue
            counts[path] += 1
            done += gain[path]
            last = path
        if last is not None and done - need > need - (done - gain[last]):  # the closer side of the target
            counts[last] -= 1
    return {g.path: order[g.path][counts[g.path]:].sort().values for g in groups}


def align_channels(groups: list[Group], scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                   multiple: int) -> dict[str, torch.Tensor]:
    """Kept units of every thinned group rounded down to the count whose channels (units x width) are the next lower
    multiple of `multiple`, the least important kept units going too, so the target stays met; a group with fewer
    channels left than one multiple gets one multiple back (its most important removed units), an emptied group stays
    empty and an untouched one whole."""
    if multiple <= 1:
        return keep
    out = {}
    for g in groups:
        kept = keep[g.path]
        k = len(kept)
        if k in (0, g.units) or (k * g.width) % multiple == 0:
            out[g.path] = kept
            continue
        step = multiple // math.gcd(multiple, g.width)  # units per multiple of channels
        want = (k // step) * step or min(step, g.units)
        order = torch.argsort(scores[g.path].detach().double(), descending=True, stable=True).tolist()
        taken = set(kept.tolist())
        if want < k:
            chosen = [u for u in order if u in taken][:want]
        else:
            chosen = kept.tolist() + [u for u in order if u not in taken][:want - k]
        out[g.path] = torch.tensor(sorted(chosen), dtype=kept.dtype)
    return out


def _uniform(groups, gain, limit, need, norm, order) -> dict[str, int]:
    """The largest common fraction of units under the target, then one more unit (the least important
    next one, in group order of score) from groups until the target is met: fractions differ by at most
    one unit."""
    def take(frac):
        return {g.path: min(limit[g.path], math.floor(frac * g.units)) for g in groups}

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(gain[p] * n for p, n in take(mid).items()) >= need:
            hi = mid
        else:
            lo = mid
    counts = take(lo)
    done = sum(gain[p] * n for p, n in counts.items())
    extra = sorted((float(norm[g.path][order[g.path][counts[g.path]]]), g.path) for g in groups
                   if counts[g.path] < limit[g.path])
    for _, path in extra:
        if done >= need:
            break
        if done + gain[path] - need > need - done:  # the closer side of the target
            continue
        counts[path] += 1
        done += gain[path]
    return counts


def reachable(groups: list[Group], gain: dict[str, float]) -> float:
    """The most of `gain` (per unit, per group) the allocation can remove: every unit of a removable group, all but
    one of any other."""
    return sum((g.units if g.removable else g.units - 1) * gain[g.path] for g in groups)


def removed_params(groups: list[Group], keep: dict[str, torch.Tensor]) -> int:
    return sum((g.units - len(keep.get(g.path, range(g.units)))) * g.params_per_unit for g in groups)
