"""l1-grad, the seed method ("Towards Tiny Diffusion", Estadimas & Zhang, NeurIPS 2024).

    I(w) = alpha * |w| / mean|w|  +  beta * G(w) / mean G,     G(w) = mean over batches of |dL_b/dw|

L_b is the denoising loss (epsilon MSE) of one calibration batch; every batch spans the whole timestep
range (model/calibration.py stratifies t), so G accumulates sensitivity over early and late denoising alike.
G is the mean of per-batch |gradients|, not |gradient of the mean|: at a trained minimum the full-data
gradient nearly cancels, per-batch magnitudes do not. Both terms are divided by their mean over all
prunable weights of the model (global normalisation) so that alpha and beta are comparable weights and
beta = 0 ranks exactly as magnitude does; per-layer normalisation would reorder layers against each other.

The schedule (prune_l1_grad) prunes in `iterations` steps along a cubic ramp s_k = s * (1 - (1 - k/K)^3)
ending exactly at s; after each step an L1-regularised recovery runs with the masks applied after every
optimizer step, and before every step the masks are recomputed from the current weights and a running
mean of the gradient magnitudes at the same s_k: a pruned weight (w = 0) whose gradient term climbs back
above the threshold returns (regrowth) and the lowest kept one leaves, so the count stays exact.
A returning weight gets back the value it had when it was pruned (a zero would make it a kept weight
that is still zero, and the count would no longer be exact); recovery then trains it from there.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tinyprune.prune.bake import apply_masks
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.masks import prunable_weights, unstructured
from tinyprune.prune.recovery import denoising_loss, mean_loss, recover

GRAD_EMA = 0.9  # running mean of |grad| used for regrowth decisions during recovery


@contextmanager
def _grads_on(params):
    params = list(params)
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None


def gradient_magnitudes(model: torch.nn.Module, batches, forward=denoising_loss,
                        engine: Engine = LOCAL) -> dict[str, torch.Tensor]:
    """Mean over batches of |dL_b/dw| for every prunable weight of `model` (model-level work). On several ranks
    each takes whole batches and the sums are all-reduced: |.| is per batch, so a batch is never split."""
    weights = prunable_weights(model)
    acc = {name: torch.zeros_like(w) for name, w in weights.items()}
    with _grads_on(weights.values()):
        for batch in engine.shard(batches):
            for w in weights.values():
                w.grad = None
            with engine.autocast():
                loss = forward(model, batch)
            engine.backward(loss)
            for name, w in weights.items():
                if w.grad is not None:
                    acc[name] += w.grad.abs()
    engine.sum_(acc.values())
    engine.unscale(acc.values(), "l1-grad gradients")
    return {name: a / max(1, len(batches)) for name, a in acc.items()}


def norms(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """mean|w| and mean G over all prunable weights: the global normalisers of the two terms."""
    n = sum(w.numel() for w in weights.values())
    mw = sum(float(w.detach().abs().sum()) for w in weights.values()) / n
    mg = sum(float(g.sum()) for g in grads.values()) / n
    return max(mw, 1e-30), max(mg, 1e-30)


def l1_grad_scores(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], alpha: float = 1.0,
                   beta: float = 1.0, scale: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """alpha * |w| / mean|w| + beta * G / mean G (higher = more important). `scale` fixes the normalisers
    (the schedule keeps the dense model's so that thresholds stay comparable across steps)."""
    mw, mg = scale or norms(weights, grads)
    return {name: (alpha / mw) * w.detach().abs() + (beta / mg) * grads[name] for name, w in weights.items()}


def l1_grad(weights: dict[str, torch.Tensor], batches=None, *, grads: dict[str, torch.Tensor],
            alpha: float = 1.0, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """The importance-function form (weights, batches) -> scores, given precomputed gradient magnitudes."""
    return l1_grad_scores(weights, grads, alpha, beta)


def ramp(sparsity: float, k: int, iterations: int) -> float:
    """Cubic schedule (Zhu & Gupta): large steps while much is redundant, small ones near the target."""
    return sparsity if k >= iterations else sparsity * (1.0 - (1.0 - k / iterations) ** 3)


@torch.no_grad()
def _remask(weights, new, old, saved) -> int:
    """Switch the weights from masks `old` to `new`: live weights refresh `saved`, returning ones get
    their saved value back, leaving ones become zero. Returns how many returned."""
    back = 0
    for n, w in weights.items():
        if old is not None:
            saved[n].copy_(torch.where(old[n], w, saved[n]))
            returning = new[n] & ~old[n]
            back += int(returning.sum())
            w.copy_(torch.where(returning, saved[n], w))
        w.mul_(new[n].to(w.dtype))
    return back


def prune_l1_grad(model: torch.nn.Module, batches, sparsity: float, *, scheduler, alpha: float = 1.0,
                  beta: float = 1.0, l1: float = 1e-5, recovery_steps: int = 200, iterations: int = 4,
                  lr: float = 1e-4, scope: str = "global", forward=denoising_loss, seed: int = 0,
                  teacher: torch.nn.Module | None = None, log=lambda msg: None,
                  engine: Engine = LOCAL) -> tuple[dict[str, torch.Tensor], dict]:
    """The iterative schedule; prunes `model` in place. Returns the final masks (exactly
    round(sparsity * n) zeros, global or per layer) and a record of what happened."""
    weights = prunable_weights(model)
    loss_dense = mean_loss(model, batches, forward, engine)
    grads = gradient_magnitudes(model, batches, forward, engine)
    scale = norms(weights, grads)
    saved = {n: w.detach().clone() for n, w in weights.items()}  # the value each weight had when pruned
    masks, regrown, steps_log = None, 0, []
    per_iter = [recovery_steps // iterations + (1 if k < recovery_steps % iterations else 0)
                for k in range(iterations)]
    for k in range(1, iterations + 1):
        s_k = ramp(sparsity, k, iterations)
        if k > 1:
            grads = gradient_magnitudes(model, batches, forward, engine)  # of the pruned, recovered model
        new = unstructured(l1_grad_scores(weights, grads, alpha, beta, scale), s_k, scope)
        back = _remask(weights, new, masks, saved)
        masks = new
        entry = {"iteration": k, "sparsity": round(s_k, 6), "regrown_at_prune": back,
                 "loss_after_prune": round(mean_loss(model, batches, forward, engine), 6)}
        steps = per_iter[k - 1]
        if steps:
            ema = {n: g.clone() for n, g in grads.items()}
            count = [0]

            def on_step(step, ws, s_k=s_k, ema=ema, count=count):
                nonlocal masks
                for n, w in ws.items():
                    if w.grad is not None:
                        ema[n].mul_(GRAD_EMA).add_(w.grad.abs(), alpha=1 - GRAD_EMA)
                new = unstructured(l1_grad_scores(ws, ema, alpha, beta, scale), s_k, scope)
                count[0] += _remask(ws, new, masks, saved)
                masks = new
                return new

            masks, rec = recover(model, masks, batches, steps, scheduler=scheduler, lr=lr, l1=l1, forward=forward,
                                 seed=seed + k, on_step=on_step, teacher=teacher, engine=engine)
            entry.update(recovery=rec, regrown_in_recovery=count[0],
                         loss_after_recovery=round(mean_loss(model, batches, forward, engine), 6))
            back += count[0]
        regrown += back
        steps_log.append(entry)
        log(f"l1-grad step {k}/{iterations}: sparsity {s_k:.4f}, loss {entry.get('loss_after_recovery', entry['loss_after_prune']):.5f} "
            f"(dense {loss_dense:.5f}), regrown {back}")
    apply_masks(model, masks)
    info = {"alpha": alpha, "beta": beta, "l1": l1, "lr": lr, "iterations": iterations,
            "recovery_steps": recovery_steps, "recovery_target": "distill" if teacher is not None else "noise",
            "regrown": regrown, "loss_dense": round(loss_dense, 6),
            "loss_pruned": round(mean_loss(model, batches, forward, engine), 6), "schedule": steps_log}
    return masks, info
