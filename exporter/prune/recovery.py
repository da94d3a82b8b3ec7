"""Recovery: the one training loop of the prune stage, a short fine-tune of the pruned UNet on calibration batches.

Unstructured and 2:4 recovery holds the masks after every step; structured recovery (distill) has no masks, the
removed units being gone.

loss = denoising MSE (the UNet's epsilon prediction against the noise that made x_t) + l1 * sum|w| over
the prunable weights (the L1 objective of "Towards Tiny Diffusion"). Each step re-noises the batch's
clean latents with fresh noise at fresh stratified timesteps, so a few dozen calibration latents serve a
few hundred steps without replaying the same (x_t, t). Adam over every UNet parameter; after each step
the masked weights are set back to exactly zero. An optional `on_step` hook sees the gradients before
the step and may return new masks: that is how the l1-grad schedule lets pruned weights regrow.

With a `teacher` (the dense UNet) the target is the teacher's epsilon on the same x_t instead of the noise
that made it: distillation, which carries the dense model's function rather than refitting a few dozen
calibration latents (--recovery-target distill, the default). Structured methods always distil: the student
learns to do what the teacher does over the whole trajectory, with no training data, for `steps` steps or
`minutes`, whichever comes first.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tinyprune.model.calibration import Batch
from tinyprune.prune.masks import prunable_weights


def denoising_loss(unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """MSE of the predicted epsilon against the true noise (the diffusion training loss)."""
    pred = unet(batch.x_t, batch.t, **batch.cond).sample
    return F.mse_loss(pred, batch.noise)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Batch], forward=denoising_loss) -> float:
    """The loss over fixed batches, weighted by batch size: the yardstick of sensitivity and recovery."""
    total = sum(float(forward(model, b)) * len(b.t) for b in batches)
    return total / sum(len(b.t) for b in batches)


def renoise(batch: Batch, scheduler, g: torch.Generator) -> Batch:
    """The same clean latents and conditioning, new noise and new timesteps (one per stratum)."""
    n_train = scheduler.config.num_train_timesteps
    b = len(batch.x0)
    edges = torch.linspace(0, n_train, b + 1)
    t = (edges[:-1] + torch.rand(b, generator=g) * (edges[1:] - edges[:-1])).long().clamp_max(n_train - 1)
    noise = torch.randn(batch.x0.shape, generator=g)
    return Batch(scheduler.add_noise(batch.x0, noise, t), t, batch.cond, noise, batch.x0)


def recover(model: torch.nn.Module, masks: dict[str, torch.Tensor], batches: list[Batch], steps: int, *,
            scheduler, lr: float = 1e-4, l1: float = 0.0, forward=denoising_loss, seed: int = 0,
            on_step=None, teacher: torch.nn.Module | None = None, minutes: float | None = None,
            log=lambda msg: None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune `model` in place for `steps` Adam steps (or until `minutes` have passed); returns the (possibly
    regrown) masks and a log."""
    weights = prunable_weights(model)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.monotonic()
    model.train()
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            if minutes is not None and time.monotonic() - t0 > 60 * minutes:
                break
            batch = renoise(batches[step % len(batches)], scheduler, g)
            if teacher is not None:
                with torch.no_grad():
                    eps = teacher(batch.x_t, batch.t, **batch.cond).sample
                batch = Batch(batch.x_t, batch.t, batch.cond, eps, batch.x0)
            loss = forward(model, batch)
            total = loss + l1 * sum(w.abs().sum() for w in weights.values()) if l1 else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            if on_step is not None:
                masks = on_step(step, weights) or masks
            opt.step()
            with torch.no_grad():
                for name, m in masks.items():
                    weights[name].mul_(m.to(weights[name].dtype))
            losses.append(float(loss.detach()))
            if len(losses) % 50 == 0 and len(losses) < steps:
                log(f"recovery: step {len(losses)}/{steps}, loss {losses[-1]:.5f}")
    finally:
        model.eval()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    done = len(losses)
    head, tail = losses[: max(1, done // 10)], losses[-max(1, done // 10):]
    record = {"steps": done, "lr": lr, "l1": l1, "target": "teacher" if teacher is not None else "noise",
              "seconds": round(time.monotonic() - t0, 1),
              "train_loss_first": round(sum(head) / len(head), 6) if losses else None,
              "train_loss_last": round(sum(tail) / len(tail), 6) if losses else None}
    return masks, record


DISTILL_LR = 2e-4


def distill(student, teacher, batches, *, scheduler, steps: int, minutes: float | None = None,
            lr: float = DISTILL_LR, seed: int = 0, log=lambda msg: None) -> dict:
    """Structured recovery: `recover` with the dense UNet as teacher and no masks; returns the record the plan
    and the report show, with the distillation loss on the calibration batches before and after."""
    loss_before = mean_loss(student, batches, _distill_loss(teacher))
    _, rec = recover(student, {}, batches, steps, scheduler=scheduler, lr=lr, seed=seed, teacher=teacher,
                     minutes=minutes, log=log)
    loss_after = mean_loss(student, batches, _distill_loss(teacher))
    log(f"recovery: {rec['steps']} distillation steps in {rec['seconds']:.0f} s, loss vs dense "
        f"{loss_before:.5f} -> {loss_after:.5f}")
    return {"steps": rec["steps"], "requested_steps": steps, "minutes": minutes, "lr": lr, "seconds": rec["seconds"],
            "objective": "distillation (MSE to the dense UNet's output)",
            "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6)}


def _distill_loss(teacher):
    def forward(student, b: Batch) -> torch.Tensor:
        target = teacher(b.x_t, b.t, **b.cond).sample
        return F.mse_loss(student(b.x_t, b.t, **b.cond).sample, target)

    return forward
