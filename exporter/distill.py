"""Recovery of a structurally pruned UNet: a short distillation from the dense one.

Each step re-noises a calibration batch's clean latents with fresh noise at fresh stratified timesteps
(recovery.renoise) and fits the pruned UNet's output to the dense UNet's output on the same input (MSE):
the student learns to do what the teacher does over the whole trajectory, with no training data. Adam over
every parameter of the pruned UNet; stops after `steps` steps or `minutes`, whichever comes first.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .recovery import renoise

DEFAULT_LR = 2e-4


@torch.no_grad()
def distill_loss(student, teacher, batches) -> float:
    total, n = 0.0, 0
    for b in batches:
        target = teacher(b.x_t, b.t, encoder_hidden_states=b.context).sample
        out = student(b.x_t, b.t, encoder_hidden_states=b.context).sample
        total += float(F.mse_loss(out, target)) * len(b.t)
        n += len(b.t)
    return total / max(n, 1)


def distill(student, teacher, batches, *, scheduler, steps: int, minutes: float | None = None,
            lr: float = DEFAULT_LR, seed: int = 0, log=lambda msg: None) -> dict:
    """Fine-tune `student` in place; returns the record the plan and the report show."""
    loss_before = distill_loss(student, teacher, batches)
    params = list(student.parameters())
    was = [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(seed)
    t0, done = time.monotonic(), 0
    student.train()
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            if minutes is not None and time.monotonic() - t0 > 60 * minutes:
                break
            b = renoise(batches[step % len(batches)], scheduler, g)
            with torch.no_grad():
                target = teacher(b.x_t, b.t, encoder_hidden_states=b.context).sample
            loss = F.mse_loss(student(b.x_t, b.t, encoder_hidden_states=b.context).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done % 50 == 0 and done < steps:
                log(f"recovery: step {done}/{steps}, loss vs dense {loss.detach().item():.5f}")
    finally:
        student.eval()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    loss_after = distill_loss(student, teacher, batches)
    seconds = time.monotonic() - t0
    log(f"recovery: {done} distillation steps in {seconds:.0f} s, loss vs dense {loss_before:.5f} -> {loss_after:.5f}")
    return {"steps": done, "requested_steps": steps, "minutes": minutes, "lr": lr, "seconds": round(seconds, 1),
            "objective": "distillation (MSE to the dense UNet's output)",
            "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6)}
