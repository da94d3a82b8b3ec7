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

On several ranks (prune/distributed.py) each step's batch is split by samples over the ranks and
DistributedDataParallel averages the gradients, each rank's loss weighted by its share of the samples: every step
is the step one process takes on the whole batch, up to rounding, and the weights stay identical on every rank.
fp16 autocast steps through torch's GradScaler (skipped steps included); bf16 needs none.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tinyprune.model.calibration import Batch
from tinyprune.model.families import take_cond
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.prune.masks import prunable_weights


def denoising_loss(unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """MSE of the predicted epsilon against the true noise (the diffusion training loss)."""
    pred = unet(batch.x_t, batch.t, **batch.cond).sample
    return F.mse_loss(pred, batch.noise)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Batch], forward=denoising_loss, engine: Engine = LOCAL) -> float:
    """The loss over fixed batches, weighted by batch size: the yardstick of sensitivity and recovery."""
    mine = engine.shard(batches)
    with engine.autocast():
        total = sum(float(forward(model, b)) * len(b.t) for b in mine)
    total, n = engine.total(total, sum(len(b.t) for b in mine))
    return total / n


def renoise(batch: Batch, scheduler, g: torch.Generator) -> Batch:
    """The same clean latents and conditioning, new noise and new timesteps (one per stratum)."""
    n_train = scheduler.config.num_train_timesteps
    b = len(batch.x0)
    edges = torch.linspace(0, n_train, b + 1)
    t = (edges[:-1] + torch.rand(b, generator=g) * (edges[1:] - edges[:-1])).long().clamp_max(n_train - 1)
    noise = torch.randn(batch.x0.shape, generator=g)  # drawn on the CPU: the same numbers on every device
    t, noise = t.to(batch.x0.device), noise.to(batch.x0.device)
    return Batch(scheduler.add_noise(batch.x0, noise, t), t, batch.cond, noise, batch.x0)


def _share(batch: Batch, engine: Engine) -> tuple[Batch, float]:
    """This rank's samples of a step's batch and the weight of its loss: its share of the samples times the number
    of ranks, as DistributedDataParallel divides the summed gradients by it."""
    if engine.world == 1:
        return batch, 1.0
    n = len(batch.t)
    part = engine.part(n)
    weight = (part.stop - part.start) * engine.world / n
    if weight == 0:  # fewer samples than ranks: a zero-weighted sample keeps this rank in DDP's all-reduce
        part = slice(0, 1)
    return Batch(batch.x_t[part], batch.t[part], take_cond(batch.cond, part), batch.noise[part], batch.x0[part]), weight


def recover(model: torch.nn.Module, masks: dict[str, torch.Tensor], batches: list[Batch], steps: int, *,
            scheduler, lr: float = 1e-4, l1: float = 0.0, forward=denoising_loss, seed: int = 0,
            on_step=None, teacher: torch.nn.Module | None = None, minutes: float | None = None,
            log=lambda msg: None, engine: Engine = LOCAL) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune `model` in place for `steps` Adam steps (or until `minutes` have passed); returns the (possibly
    regrown) masks and a log."""
    weights = prunable_weights(model)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(seed)  # the same draws on every rank: each renoises the whole batch
    scaler = torch.amp.GradScaler(engine.device.type, enabled=engine.amp == torch.float16)
    losses = []
    t0 = time.monotonic()
    model.train()
    try:
        for p in params:
            p.requires_grad_(True)
        net = engine.replicate(model)  # after requires_grad: DDP hooks the parameters that take gradients
        opt = torch.optim.Adam(params, lr=lr)
        with engine.checkpointed(model):
            for step in range(steps):
                if minutes is not None and engine.any(time.monotonic() - t0 > 60 * minutes):
                    break
                batch, weight = _share(renoise(batches[step % len(batches)], scheduler, g), engine)
                if teacher is not None:
                    with torch.no_grad(), engine.autocast():
                        eps = teacher(batch.x_t, batch.t, **batch.cond).sample.float()
                    batch = Batch(batch.x_t, batch.t, batch.cond, eps, batch.x0)
                with engine.autocast():
                    loss = forward(net, batch)
                total = loss + l1 * sum(w.abs().sum() for w in weights.values()) if l1 else loss
                opt.zero_grad(set_to_none=True)
                scaler.scale(total * weight if engine.world > 1 else total).backward()
                scaler.unscale_(opt)  # the hook reads true gradients
                if on_step is not None and (not scaler.is_enabled() or _finite(weights)):
                    masks = on_step(step, weights) or masks
                scaler.step(opt)
                scaler.update()
                with torch.no_grad():
                    for name, m in masks.items():
                        weights[name].mul_(m.to(weights[name].dtype))
                losses.append(engine.total(float(loss.detach()) * weight / engine.world)[0])
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


def _finite(weights) -> bool:
    """fp16: whether this step's gradients are usable (GradScaler skips the step otherwise; so does the hook)."""
    return all(bool(torch.isfinite(w.grad).all()) for w in weights.values() if w.grad is not None)


DISTILL_LR = 2e-4


def distill(student, teacher, batches, *, scheduler, steps: int, minutes: float | None = None,
            lr: float = DISTILL_LR, seed: int = 0, log=lambda msg: None, engine: Engine = LOCAL) -> dict:
    """Structured recovery: `recover` with the dense UNet as teacher and no masks; returns the record the plan
    and the report show, with the distillation loss on the calibration batches before and after."""
    loss_before = mean_loss(student, batches, _distill_loss(teacher), engine)
    _, rec = recover(student, {}, batches, steps, scheduler=scheduler, lr=lr, seed=seed, teacher=teacher,
                     minutes=minutes, log=log, engine=engine)
    loss_after = mean_loss(student, batches, _distill_loss(teacher), engine)
    log(f"recovery: {rec['steps']} distillation steps in {rec['seconds']:.0f} s, loss vs dense "
        f"{loss_before:.5f} -> {loss_after:.5f}")
    return {"steps": rec["steps"], "requested_steps": steps, "minutes": minutes, "lr": lr, "seconds": rec["seconds"],
            "objective": "distillation (MSE to the dense UNet's output)",
            "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6)}


def _distill_loss(teacher):
    def forward(student, b: Batch) -> torch.Tensor:
        target = teacher(b.x_t, b.t, **b.cond).sample.float()
        return F.mse_loss(student(b.x_t, b.t, **b.cond).sample.float(), target)

    return forward
