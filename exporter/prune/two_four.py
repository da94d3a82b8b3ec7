"""2:4 where TensorRT can use it and where it hurts least.

Eligibility per layer by shape: TensorRT's rule is that for every output channel and every kernel position,
each 4 consecutive input channels hold at least 2 zeros, so the input-channel count must be a multiple of 4
(TensorRT Developer Guide, "Structured Sparsity"/"Sparsity" section: "assuming that the kernel weights have
the shape [K, C, R, S] and C % 4 == 0 ..."). The same guide says TensorRT reports which layers are
*eligible* and which it *picked*, and that "in some cases, tactics with structured sparsity can be slower
than normal tactics and TensorRT will choose normal tactics in these cases" -- it times both and keeps the
faster. It gives no channel threshold; thin layers are where the sparse tactic loses (too little math per
weight byte to hide the metadata). MIN_2TO4_CHANNELS is therefore our own conservative cut, not TensorRT's:
a layer below it stays dense and the report says why, since 2:4 there would cost quality for no speed.

Ranking: each eligible layer alone is made 2:4 (selection within the layer by the method's score) and the
loss increase on calibration batches is measured; the least sensitive layers are sparsified first until the
requested global sparsity. Without calibration data (the VAE, which has no denoising loss) the fallback is
the data-free ranking by the fraction of weight energy the 2:4 mask removes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from tinyprune.prune.masks import NM_AXIS, n_of_m, nm_eligible
from tinyprune.prune.recovery import denoising_loss, mean_loss
from tinyprune.prune.distributed import LOCAL, Engine

MIN_2TO4_CHANNELS = 64


def eligibility(w: torch.Tensor) -> str | None:
    """None when the layer gets 2:4, else the reason it stays dense."""
    reason = nm_eligible(w)
    if reason is None and w.shape[NM_AXIS] < MIN_2TO4_CHANNELS:
        reason = (f"{w.shape[NM_AXIS]} input channels < {MIN_2TO4_CHANNELS}: too thin for TensorRT to pick a "
                  f"sparse kernel (it keeps the faster dense tactic)")
    return reason


def energy_lost(w: torch.Tensor, mask: torch.Tensor) -> float:
    w = w.detach()
    return float((w * ~mask).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def sensitivity(model: torch.nn.Module, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                batches, forward=denoising_loss, engine: Engine = LOCAL,
                log=lambda msg: None) -> tuple[float, dict[str, float]]:
    """Loss on `batches` of the dense model, and its increase when each masked layer alone is applied; a log line
    at every tenth of the layers (one loss evaluation each: minutes at Stable Diffusion size)."""
    base = mean_loss(model, batches, forward, engine)
    out, t0, every = {}, time.perf_counter(), max(1, len(masks) // 10)
    for i, (name, mask) in enumerate(masks.items(), 1):
        w = weights[name]
        saved = w.detach().clone()
        w.mul_(mask.to(w.dtype))
        out[name] = mean_loss(model, batches, forward, engine) - base
        w.copy_(saved)
        if i % every == 0 or i == len(masks):
            log(f"2:4 sensitivity: {i}/{len(masks)} layers, {time.perf_counter() - t0:.0f} s")
    return base, out


def select(model: torch.nn.Module, weights: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
           sparsity: float, batches=None, forward=denoising_loss, engine: Engine = LOCAL, log=lambda msg: None):
    """2:4 masks on the least sensitive eligible layers until `sparsity` of all prunable weights is zero.

    Each chosen layer contributes exactly half its weights; the achieved sparsity is the largest reachable
    value not above the request (layers that would overshoot are skipped, smaller ones may still fit).
    Returns the masks and the per-layer decision table recorded in the plan.
    """
    total = sum(w.numel() for w in weights.values())
    decisions, candidates = {}, {}
    for name, w in weights.items():
        reason = eligibility(w)
        if reason:
            decisions[name] = {"pattern": "none", "reason": reason}
        else:
            candidates[name] = None
    # Masks are made on access, and the chosen ones handed to baking one layer at a time, instead of holding a bool
    # mask per chosen layer (0.7 GiB for an SD-1.5 UNet at 0.43). A caller whose recovery changes the weights
    # these lazy masks are made from fixes them first (prune/run.py).
    candidates = _LazyMasks(list(candidates), scores)
    if batches:
        _, sens = sensitivity(model, weights, candidates, batches, forward, engine, log)
        key = "sensitivity"
    else:
        sens = {name: energy_lost(weights[name], m) for name, m in candidates.items()}
        key = "energy_lost"
    chosen, budget = [], round(sparsity * total)
    order = sorted(candidates, key=lambda n: (sens[n], n))
    for rank, name in enumerate(order):
        half = weights[name].numel() // 2
        entry = {key: round(sens[name], 8), "rank": rank}
        if half <= budget:
            chosen.append(name)
            budget -= half
            decisions[name] = {"pattern": "2:4", **entry}
        else:
            decisions[name] = {"pattern": "none", "reason": "target sparsity reached", **entry}
    picked = set(chosen)
    chosen = [name for name in candidates if name in picked]  # model order, as before
    return _LazyMasks(chosen, scores), decisions


class _LazyMasks(Mapping):
    """{name: 2:4 mask of scores[name]}, made on each access; read each before its layer is baked."""

    def __init__(self, names: list[str], scores):
        self._names, self._scores = names, scores

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return n_of_m(self._scores[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
