"""LD-Pruner's importance (Castells et al. 2024, "LD-Pruner: Efficient Pruning of Latent Diffusion
Models using Task-Agnostic Insights").

Task-agnostic: the score of a unit is how much removing it moves the statistics of the UNet's output
latent. Over the calibration inputs (x_t, t, cond) -- timesteps stratified over the whole trajectory --
the dense outputs give a per-element mean mu and variance var across samples; with the unit masked
(exactly what its removal computes, see groups.Gates) the same inputs give mu', var', and

    score = ||mu' - mu||_2 / sqrt(d) + ||var' - var||_2 / sqrt(d)      (d = elements of one latent)

the sum of the change of the mean and of the variance (LD-Pruner's operator score, applied per unit;
normalised by sqrt(d) so the figure does not grow with the latent size). `chunk` units are evaluated in
one forward by giving each copy of the calibration batch its own gates. On several ranks each scores its share of
the chunks, every forward the one a single process runs, and the scores are all-reduced (the other ranks add
zeros): the same scores as one process.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from tinyprune.model.families import cat_cond, repeat_cond
from tinyprune.model.structure import Group

from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.structured.gates import Gates

DEFAULT_CHUNK = 8


def _stats(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = outputs.double()
    return x.mean(0), x.var(0, unbiased=False)


def score_of(mu, var, mu_ref, var_ref) -> float:
    d = mu_ref.numel() ** 0.5
    return float((mu - mu_ref).norm() / d + (var - var_ref).norm() / d)


@torch.no_grad()
def latent_stats(unet, groups: list[Group], batches, *, chunk: int = DEFAULT_CHUNK, log=lambda msg: None,
                 info: dict | None = None, engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """{group path: importance per unit}."""
    x = torch.cat([b.x_t for b in batches])
    t = torch.cat([b.t for b in batches])
    cond = cat_cond([b.cond for b in batches])
    n = len(x)

    def run(gates: Gates | None, copies: int):
        xs, ts, cs = x.repeat(copies, 1, 1, 1), t.repeat(copies), repeat_cond(cond, copies)
        with engine.autocast(), gates or nullcontext():
            return unet(xs, ts, **cs).sample

    mu_ref, var_ref = _stats(run(None, 1))
    scores, forwards = {}, 1
    total, t0 = 1 + sum(-(-g.units // chunk) for g in groups), time.perf_counter()
    every = max(1, total // 10)  # a line at every tenth: at Stable Diffusion 1.5's size 185 forwards take minutes
    for g in groups:
        s = torch.zeros(g.units, dtype=torch.float64)  # float64: the scores of score_of, all-reduced exactly
        for start in range(0, g.units, chunk):
            forwards += 1
            if forwards % every == 0:
                log(f"ld-pruner: {forwards}/{total} forwards, {time.perf_counter() - t0:.0f} s")
            if (forwards - 2) % engine.world != engine.rank:  # chunks round robin over the ranks
                continue
            units = list(range(start, min(g.units, start + chunk)))
            gate = torch.ones(len(units) * n, g.units, device=x.device)
            for k, u in enumerate(units):
                gate[k * n:(k + 1) * n, u] = 0.0
            out = run(Gates(unet, [g], {g.path: gate}), len(units)).view(len(units), n, *x.shape[1:])
            for k, u in enumerate(units):
                s[u] = score_of(*_stats(out[k]), mu_ref, var_ref)
        scores[g.path] = s.to(x.device)
    engine.sum_(scores.values())
    scores = {path: s.cpu().float() for path, s in scores.items()}
    log(f"ld-pruner: {sum(g.units for g in groups)} units scored on {n} calibration latents in {forwards} forwards")
    if info is not None:
        info.update({"calibration_latents": n, "forwards": forwards})
    return scores
