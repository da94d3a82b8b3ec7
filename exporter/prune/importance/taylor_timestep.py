"""Diff-Pruning's importance (Fang et al. 2023, "Structural Pruning for Diffusion Models").

First-order Taylor importance of a group's unit: sum over every parameter that goes with the unit of
|w * dL/dw|, where the gradient is accumulated over timesteps ("a Taylor expansion over pruned
timesteps"). Timesteps are visited from t = 0 upwards, as in the reference implementation
(VainF/Diff-Pruning): at each one the denoising loss L_t of the calibration latents (fixed clean latents
and fixed noise, re-noised at t) is back-propagated and its gradient added; L_max is the largest L_t so
far, and accumulation stops after the first timestep whose loss falls under threshold * L_max
(L_t / L_max < T): later, noisier steps have converged, uninformative gradients. The reference visits all
1000 training timesteps one by one; `stride` visits every stride-th (same rule, fewer backward passes).
On several ranks each takes whole calibration batches; L_t is all-reduced at every timestep (every rank stops at
the same one) and the accumulated gradients once, before |w * dL/dw|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyprune.model.structure import Group
from tinyprune.prune.distributed import LOCAL, Engine

from tinyprune.prune.structured.groups import unit_params, unit_sums

DEFAULT_THRESHOLD = 0.05
DEFAULT_STRIDE = 20


def taylor_timestep(unet, groups: list[Group], batches, *, scheduler, threshold: float = DEFAULT_THRESHOLD,
                    stride: int | None = None, log=lambda msg: None, info: dict | None = None,
                    engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """{group path: importance per unit}; `info` (a dict) receives the timesteps used and their losses."""
    stride = DEFAULT_STRIDE if stride is None else stride
    params = {id(p): p for g in groups for p, _, _ in unit_params(unet, g)}
    all_params = list(unet.parameters())
    was = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
        p.grad = None
    for p in params.values():
        p.requires_grad_(True)
    n_train = scheduler.config.num_train_timesteps
    used, loss_max = [], 0.0
    n = sum(len(b.x0) for b in batches)
    try:
        for t in range(0, n_train, stride):
            loss_t = 0.0
            for b in engine.shard(batches):
                tt = torch.full((len(b.x0),), t, dtype=torch.long, device=b.x0.device)
                x_t = scheduler.add_noise(b.x0, b.noise, tt)
                with engine.autocast():
                    loss = F.mse_loss(unet(x_t, tt, **b.cond).sample.float(), b.noise)
                if loss.requires_grad:  # (no group parameters: only the losses are wanted)
                    engine.backward(loss * len(b.x0) / n)
                loss_t += float(loss.detach()) * len(b.x0) / n
            loss_t = engine.total(loss_t)[0]
            used.append((t, round(loss_t, 6)))
            loss_max = max(loss_max, loss_t)
            if loss_t < threshold * loss_max:
                break
        engine.sum_grads(params.values())
        engine.unscale([p.grad for p in params.values() if p.grad is not None], "diff-pruning gradients")
        scores = {g.path: unit_sums(unet, g, lambda p: (p * p.grad).abs() if p.grad is not None else None).float()
                  for g in groups}
    finally:
        for p, r in zip(all_params, was):
            p.requires_grad_(r)
            p.grad = None
    log(f"diff-pruning: gradients accumulated over {len(used)} timesteps (t = 0..{used[-1][0]}, stride {stride}; "
        f"stopped at L_t/L_max < {threshold})")
    if info is not None:
        info.update({"threshold": threshold, "stride": stride, "timesteps": [t for t, _ in used],
                     "losses": [loss for _, loss in used]})
    return scores
