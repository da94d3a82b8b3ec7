"""EcoDiff's importance (Zhang et al., "Learnable Sparsity for Vision Generative Models").

A hard-concrete gate (Louizos et al. 2018) on every unit -- attention heads, feed-forward widths and, as
the same machinery allows it, resnet channel groups -- shared by all denoising steps. The gates are
trained end to end: the gated UNet runs the whole (short) DDIM trajectory with classifier-free guidance
from fixed initial noise, and the loss compares its final latent with the dense model's final latent
from the same noise and conditions, plus an L0 penalty (the expected number of open gates, as a fraction of
all gates):

    loss = ||x0_gated - x0_dense||^2 / var(x0_dense) + l0 * E[open gates] / gates

Back-propagating through every step would keep every step's activations; each step is wrapped in
torch.utils.checkpoint instead (EcoDiff's time-step gradient checkpointing): only the latent between
steps is kept and a step's activations are recomputed during the backward pass. Only the gates' log_alpha
are trained; the UNet's weights stay frozen. Gradient checkpointing (--gradient-checkpointing) adds diffusers'
own checkpointing of the UNet's blocks inside each step's: the recomputed step then keeps one block's activations
at a time instead of the whole UNet's.

On several ranks every rank draws the same trajectory sets and gates (one generator, the same draws) and runs
its share of each set's samples; the fit is a sum over samples, so the gates' gradients are all-reduced (summed)
and every rank takes the same Adam step.

The score of a unit is its probability of a non-zero gate, sigmoid(log_alpha - beta * log(-gamma/zeta));
prune/structured/allocation.py thresholds the scores to the requested target.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.checkpoint import checkpoint

from tinyprune.model.families import cat_cond, take_cond
from tinyprune.model.sampling import guided_eps
from tinyprune.model.structure import Group

from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.structured.gates import Gates

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
DEFAULT_ITERATIONS = 60
DEFAULT_STEPS = 8
DEFAULT_LR = 0.1
DEFAULT_L0 = 0.5
DEFAULT_INIT = 3.0
DEFAULT_GUIDANCE = 3.0


def sample_gates(log_alpha: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=g).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def _trajectory(unet, scheduler, noise, cond, uncond, guidance, checkpointed: bool):
    latents = noise * scheduler.init_noise_sigma

    def step(lat, t):
        eps = guided_eps(unet, scheduler.scale_model_input(lat, t), t, cond, uncond, guidance)
        return scheduler.step(eps, t, lat, eta=0.0).prev_sample

    for t in scheduler.timesteps:
        latents = checkpoint(step, latents, t, use_reentrant=False) if checkpointed else step(latents, t)
    return latents


def hard_concrete(unet, groups: list[Group], batches, *, scheduler, null_condition,
                  iterations: int = DEFAULT_ITERATIONS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                  l0: float = DEFAULT_L0, init: float = DEFAULT_INIT, guidance: float = DEFAULT_GUIDANCE,
                  trajectories: int = 2, batch: int = 8, minutes: float | None = None, seed: int = 0,
                  log=lambda msg: None, info: dict | None = None, engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """{group path: P(gate open) per unit}. Contexts come from the calibration batches; `trajectories`
    fixed (noise, condition) sets of `batch` samples are cycled over the iterations; null_condition(n) gives the
    unconditional conditioning of n samples (the family's; None: the family samples without guidance)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    conds = cat_cond([b.cond for b in batches])
    n_conds = sum(len(b.x0) for b in batches)
    shape, device = batches[0].x0.shape[1:], batches[0].x0.device
    sets = []
    with torch.no_grad(), engine.autocast():
        for i in range(trajectories):
            idx = torch.randint(0, n_conds, (batch,), generator=g)
            cond = take_cond(conds, idx.to(device))
            uncond = null_condition(batch)
            noise = torch.randn((batch, *shape), generator=g).to(device)
            target = _trajectory(unet, sched, noise, cond, uncond, guidance, checkpointed=False).float()
            sets.append((noise, cond, uncond, target, target.var().clamp_min(1e-12)))
    log_alpha = {grp.path: torch.full((grp.units,), float(init), device=device, requires_grad=True) for grp in groups}
    mine = engine.part(batch)  # this rank's samples of every set
    opt = torch.optim.Adam(list(log_alpha.values()), lr=lr)
    n_gates = sum(grp.units for grp in groups)
    params = list(unet.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    history, t0, done = [], time.monotonic(), 0
    try:
        with Gates(unet, groups) as gates, engine.checkpointed(unet):
            for it in range(iterations):
                if minutes is not None and engine.any(time.monotonic() - t0 > 60 * minutes):
                    break
                noise, cond, uncond, target, var = sets[it % len(sets)]
                for path, la in log_alpha.items():
                    gates.set(path, sample_gates(la, g))
                fit = torch.zeros((), device=device)  # this rank's share of the mean squared error
                if mine.stop > mine.start:
                    with engine.autocast():
                        out = _trajectory(unet, sched, noise[mine], take_cond(cond, mine),
                                          None if uncond is None else take_cond(uncond, mine), guidance,
                                          checkpointed=True)
                    fit = (out.float() - target[mine]).pow(2).sum() / target.numel() / var
                expected = sum(open_probability(la).sum() for la in log_alpha.values()) / n_gates
                loss = fit + l0 * expected / engine.world
                opt.zero_grad(set_to_none=True)
                engine.backward(loss)
                engine.sum_grads(log_alpha.values())
                engine.unscale([la.grad for la in log_alpha.values()], "ecodiff gate gradients")
                opt.step()
                done += 1
                history.append((round(engine.total(float(fit.detach()))[0], 6), round(float(expected.detach()), 4)))
                if done % 10 == 0 and done < iterations:  # minutes per iteration at Stable Diffusion size
                    log(f"ecodiff: iteration {done}/{iterations}, fit {history[-1][0]:.4f}, "
                        f"expected open gates {history[-1][1]:.3f}, {time.monotonic() - t0:.0f} s")
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
    scores = {path: open_probability(la.detach()) for path, la in log_alpha.items()}
    if history:
        log(f"ecodiff: {done} iterations of {steps}-step trajectories (checkpointed), fit {history[0][0]:.4f} -> "
            f"{history[-1][0]:.4f}, expected open gates {history[-1][1]:.3f}")
    if info is not None:
        info.update({"iterations": done, "steps": steps, "lr": lr, "l0": l0, "trajectories": trajectories,
                     "batch": batch, "fit_first": history[0][0] if history else None,
                     "fit_last": history[-1][0] if history else None,
                     "open_last": history[-1][1] if history else None})
    return scores
