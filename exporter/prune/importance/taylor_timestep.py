"""Diff-Pruning's importance (Fang et al. 2023, "Structural Pruning for Diffusion Models").

First-order Taylor importance of a group's unit: sum over every parameter that goes with the unit of
|w * dL/dw|, where the gradient is accumulated over timesteps ("a Taylor expansion over pruned
timesteps"). Timesteps are visited from t = 0 upwards, as in the reference implementation
(VainF/Diff-Pruning): at each one the denoising loss L_t of the calibration latents (fixed clean latents
and fixed noise, re-noised at t) is back-propagated and its gradient added; L_max is the largest L_t so
far, and accumulation stops after the first timestep whose loss falls under threshold * L_max
(L_t / L_max < T): later, noisier steps have converged, uninformative gradients. The reference visits all
1000 training timesteps one by one; `stride` visits every stride-th (same rule, fewer backward passes): every 20th by
default, every 100th on a UNet past config.LARGE_UNET_BYTES (at SD-1.5's size each timestep costs a forward and a
partial backward per gradient pass, below).

The summed gradient is as large as the parameters it belongs to: past GRADIENT_FLOOR it is held for at most
GRADIENT_SHARE of the UNet's weights at a time, the parameters taken in passes (in module order), each pass running
the same timesteps (the first pass decides them) with gradients on its own parameters only. Every parameter's
summed gradient is the one a single pass gives; the passes cost forwards (a pass over the last blocks back-propagates
through those blocks only). At Stable Diffusion 1.5's size: 16 passes, 0.2 GiB of gradients instead of 3, and the
blocks' activations recomputed in the backward (diffusers' gradient checkpointing) rather than kept.
On several ranks each takes whole calibration batches; L_t is all-reduced at every timestep (every rank stops at
the same one) and each pass's accumulated gradients once, before |w * dL/dw|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyprune.config import large_unet
from tinyprune.model.structure import Group
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.structured.groups import unit_params, unit_sums
from tinyprune.runtime.measure import release_free_memory

DEFAULT_THRESHOLD = 0.05
DEFAULT_STRIDE = 20
LARGE_STRIDE = 100
GRADIENT_SHARE = 1 / 16  # of the UNet's weight bytes: the most gradient held at once ...
GRADIENT_FLOOR = 512 * 2 ** 20  # ... once the whole of it would be over this (smaller UNets take one pass)


def gradient_passes(unet, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` split, in order, into passes whose gradients each take at most GRADIENT_SHARE of the UNet's weight
    bytes (one pass when all of them fit under GRADIENT_FLOOR)."""
    size = [p.numel() * p.element_size() for p in params]
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    if sum(size) <= GRADIENT_FLOOR:
        return [params] if params else []
    budget = max(GRADIENT_SHARE * weights, max(size))
    passes, held = [[]], 0
    for p, n in zip(params, size):
        if held + n > budget and passes[-1]:
            passes.append([])
            held = 0
        passes[-1].append(p)
        held += n
    return passes


def taylor_timestep(unet, groups: list[Group], batches, *, scheduler, threshold: float = DEFAULT_THRESHOLD,
                    stride: int | None = None, log=lambda msg: None, info: dict | None = None,
                    engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """{group path: importance per unit}; `info` (a dict) receives the timesteps used and their losses."""
    all_params = list(unet.parameters())
    large = large_unet(unet)
    stride = (LARGE_STRIDE if large else DEFAULT_STRIDE) if stride is None else stride
    # a large UNet's activations, kept for the backward, would take what the passes save: recomputed instead
    checkpointed = large and hasattr(unet, "enable_gradient_checkpointing")
    wanted = {id(p) for g in groups for p, _, _ in unit_params(unet, g)}
    passes = gradient_passes(unet, [p for p in all_params if id(p) in wanted]) or [[]]
    was = [p.requires_grad for p in all_params]
    n_train = scheduler.config.num_train_timesteps
    used, loss_max = [], 0.0
    n = sum(len(b.x0) for b in batches)
    scores = {g.path: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    try:
        if checkpointed:
            unet.enable_gradient_checkpointing()
        for i, params in enumerate(passes):
            for p in all_params:
                p.requires_grad_(False)
                p.grad = None
            for p in params:
                p.requires_grad_(True)
            if len(passes) > 1:
                log(f"diff-pruning: gradient pass {i + 1} of {len(passes)} "
                    f"({sum(p.numel() for p in params) / 1e6:.0f}M parameters)")
            for t in range(0, n_train, stride) if i == 0 else [t for t, _ in used]:
                loss_t = 0.0
                for b in engine.shard(batches):
                    tt = torch.full((len(b.x0),), t, dtype=torch.long, device=b.x0.device)
                    x_t = scheduler.add_noise(b.x0, b.noise, tt)
                    with engine.autocast():
                        loss = F.mse_loss(unet(x_t, tt, **b.cond).sample.float(), b.noise)
                    if loss.requires_grad:  # (no group parameters: only the losses are wanted)
                        engine.backward(loss * len(b.x0) / n)
                    loss_t += float(loss.detach()) * len(b.x0) / n
                if i > 0:
                    continue
                loss_t = engine.total(loss_t)[0]
                used.append((t, round(loss_t, 6)))
                loss_max = max(loss_max, loss_t)
                if loss_t < threshold * loss_max:
                    break
            engine.sum_grads(params)
            engine.unscale([p.grad for p in params if p.grad is not None], "diff-pruning gradients")
            for p in params:  # |w * dL/dw| in the gradient's own memory (its last use): no per-tensor temporaries
                if p.grad is not None:
                    p.grad.mul_(p.detach()).abs_()
            for g in groups:  # the parameters of other passes have no gradient here
                scores[g.path] += unit_sums(unet, g, lambda p: p.grad)
            release_free_memory()  # the pass's freed gradients and recomputed activations, back to the OS
    finally:
        if checkpointed:
            unet.disable_gradient_checkpointing()
        for p, r in zip(all_params, was):
            p.requires_grad_(r)
            p.grad = None
    log(f"diff-pruning: gradients accumulated over {len(used)} timesteps (t = 0..{used[-1][0]}, stride {stride}; "
        f"stopped at L_t/L_max < {threshold})")
    if info is not None:
        info.update({"threshold": threshold, "stride": stride, "timesteps": [t for t, _ in used],
                     "losses": [loss for _, loss in used], "gradient_passes": len(passes)})
    return {path: s.float() for path, s in scores.items()}
