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
`minutes`, whichever comes first, the learning rate decaying along a half cosine to 0 over that run (on the demo at
--speedup 2 this, with a 5x higher starting rate, took the FD ratio from 1.42 to 1.04 in the same 2000 steps:
benchmarks/results/speedup.md). Their distillation is BK-SDM's: the output's MSE plus, weighted by
`feature_weight`, the MSE of every stage block's output (down blocks, mid block, up blocks: the structured
methods thin the insides of blocks, never their outputs, so student and teacher features have one shape), and it
stops early on a held-out loss: every EVAL_EVERY steps the output MSE to the teacher on held-out calibration
batches (a calibration batch training never sees, HELD_OUT_DRAWS draws of it at fixed noise and timesteps) is
measured, the best weights so far are kept, and, once the rate has decayed under ARMED_BELOW of its start,
PATIENCE evaluations without a gain end the run with the best weights back.

A UNet past config.LARGE_UNET_BYTES of fp32 weights distils lean, in one CPU process (the standard recovery holds the
teacher, Adam's two moments and the early stop's copy beside the student: about 4.5x Stable Diffusion 1.5's weights):
the dense UNet records its outputs before surgery on the calibration batches, the held-out draws and the run's first
POOL_DRAWS training draws (the standard path's draws; with --recovery-minutes, those recorded within RECORD_SHARE of
them), which the run then cycles, so no teacher stays in memory; output distillation only (block features would be
kept per draw); Adafactor (factored second moments, no first: a few rows and columns of state per weight), each
parameter stepped as soon as its gradient is complete, so the gradients never exist all at once; the early stop's
best weights written to disk. On the demo it costs quality (benchmarks/results/lean_recovery.md).

On several ranks (prune/distributed.py) each step's batch is split by samples over the ranks and
DistributedDataParallel averages the gradients, each rank's loss weighted by its share of the samples: every step
is the step one process takes on the whole batch, up to rounding, and the weights stay identical on every rank.
fp16 autocast steps through torch's GradScaler (skipped steps included); bf16 needs none.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


@contextmanager
def block_outputs(unet: torch.nn.Module, into: list):
    """Forward hooks that append each stage block's output hidden states (down blocks, mid block, up blocks, in
    call order) to `into`: the feature-distillation points."""
    blocks = [*(getattr(unet, "down_blocks", None) or []), *([unet.mid_block] if getattr(unet, "mid_block", None)
                                                              is not None else []),
              *(getattr(unet, "up_blocks", None) or [])]
    handles = [b.register_forward_hook(lambda m, a, out: into.append(out[0] if isinstance(out, tuple) else out))
               for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


EVAL_EVERY = 25  # steps between held-out evaluations of the early stop
PATIENCE = 4  # evaluations without a gain (MIN_GAIN of the best) before the run stops
ARMED_BELOW = 0.1  # a decaying rate: the stop counts only once the rate is under this fraction of its start (the
# last ~20 % of the run). At a higher rate the held-out loss moves with the steps' noise and the gains come late: on
# the demo at --speedup 2 a stop counting from the start ended 2000 decaying steps at 675 (FD ratio 1.18), one
# counting under half the rate at 1200 (1.04, accuracy 0.98), where the whole run gave 1.005 and 0.99
HELD_OUT_DRAWS = 4  # fixed noise draws of each held-out batch: a small last batch alone judged the stop by chance
MIN_GAIN = 0.002


class EarlyStop:
    """The held-out loss along a run: the best weights so far (on the CPU, or in the file `on_disk`), and whether
    to stop."""

    def __init__(self, model, evaluate, on_disk: Path | None = None):
        self.model, self.evaluate, self.on_disk = model, evaluate, on_disk
        self.best, self.best_step, self.bad, self.state, self.history = float("inf"), 0, 0, None, []

    def check(self, step: int, armed: bool = True) -> bool:
        """Evaluate at `step`; whether to stop. Not `armed`: the best weights are still kept, the evaluations
        without a gain are not counted."""
        loss = self.evaluate()
        self.history.append([step, round(loss, 6) if math.isfinite(loss) else None])  # None: diverged
        if loss < self.best * (1 - MIN_GAIN):
            self.best, self.best_step, self.bad = loss, step, 0
            if self.on_disk is not None:
                self.state = _write_tensors(self.model.state_dict(), self.on_disk)
            else:
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        elif armed:
            self.bad += 1
        return self.bad >= PATIENCE

    def restore(self) -> bool:
        """The best weights back if the last evaluation was not the best; whether they were."""
        if self.state is None or self.history[-1][0] == self.best_step:
            return False
        if self.on_disk is not None:
            _read_tensors(self.model.state_dict(), self.on_disk)
        else:
            self.model.load_state_dict(self.state)
        return True


def _write_tensors(state: dict, path: Path) -> bool:
    """The tensors' bytes, one after the other, in a raw file (read back in place by _read_tensors)."""
    with open(path, "wb") as f:
        for v in state.values():
            f.write(memoryview(v.detach().cpu().contiguous().numpy()).cast("B"))
    return True


@torch.no_grad()
def _read_tensors(state: dict, path: Path) -> None:
    """_write_tensors' file into the same tensors, one at a time: no second copy of the weights."""
    with open(path, "rb") as f:
        for v in state.values():
            buf = torch.empty(v.shape, dtype=v.dtype)
            f.readinto(memoryview(buf.numpy()).cast("B"))
            v.copy_(buf)


def recover(model: torch.nn.Module, masks: dict[str, torch.Tensor], batches: list[Batch], steps: int, *,
            scheduler, lr: float = 1e-4, l1: float = 0.0, forward=denoising_loss, seed: int = 0,
            on_step=None, teacher: torch.nn.Module | None = None, minutes: float | None = None,
            feature_weight: float = 0.0, early_stop: EarlyStop | None = None, cosine: bool = False,
            drawn: bool = False, lean: bool = False,
            log=lambda msg: None, engine: Engine = LOCAL) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune `model` in place for `steps` Adam steps (or until `minutes` have passed, or `early_stop` says
    so); returns the (possibly regrown) masks and a log. `feature_weight` (with a teacher): the weight of the
    stage blocks' feature MSE beside the output's. `cosine`: the learning rate decays along a half cosine from `lr`
    to 0 over the run, `steps` or `minutes`, whichever ends it first. `drawn`: `batches` are the steps' draws
    already (step s takes batch s mod their number as it is). `lean`: Adafactor, each parameter stepped in the
    backward pass as soon as its gradient is complete (no masks, no hook, one process; the module docstring)."""
    if lean and (masks or on_step is not None or l1 or engine.world > 1 or engine.amp == torch.float16):
        raise ValueError("lean recovery: no masks, no step hook, no L1, one process, no fp16 loss scaling")
    weights = prunable_weights(model)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(seed)  # the same draws on every rank: each renoises the whole batch
    scaler = torch.amp.GradScaler(engine.device.type, enabled=engine.amp == torch.float16)
    losses, hooks = [], []
    t0 = time.monotonic()
    model.train()
    try:
        for p in params:
            p.requires_grad_(True)
        net = engine.replicate(model)  # after requires_grad: DDP hooks the parameters that take gradients
        if lean:
            opts = []
            for p in params:
                opt, hook = _step_now(p, lr)
                opts.append(opt)
                hooks.append(p.register_post_accumulate_grad_hook(hook))
        else:
            opts = [torch.optim.Adam(params, lr=lr)]
        opt = opts[0]
        with engine.checkpointed(model):
            for step in range(steps):
                if minutes is not None and engine.any(time.monotonic() - t0 > 60 * minutes):
                    break
                rate = _cosine(step, steps, minutes, time.monotonic() - t0, engine) if cosine else 1.0
                armed = not cosine or rate < ARMED_BELOW
                if early_stop is not None and step % EVAL_EVERY == 0 and early_stop.check(step, armed):
                    break
                for o in opts:
                    for group in o.param_groups:
                        group["lr"] = lr * rate
                batch = batches[step % len(batches)]
                batch, weight = _share(batch if drawn else renoise(batch, scheduler, g), engine)
                feats_t, feats_s = [], []
                if teacher is not None:
                    with torch.no_grad(), engine.autocast(), block_outputs(teacher, feats_t if feature_weight else []):
                        eps = teacher(batch.x_t, batch.t, **batch.cond).sample.float()
                    batch = Batch(batch.x_t, batch.t, batch.cond, eps, batch.x0)
                with engine.autocast(), block_outputs(model, feats_s if feature_weight else []):
                    loss = forward(net, batch)
                total = loss + l1 * sum(w.abs().sum() for w in weights.values()) if l1 else loss
                if feats_t:  # the first len(feats_t): checkpointed blocks may run their forward again later
                    total = total + feature_weight * sum(F.mse_loss(s.float(), t.float())
                                                         for s, t in zip(feats_s, feats_t))
                opt.zero_grad(set_to_none=True)
                scaler.scale(total * weight if engine.world > 1 else total).backward()  # lean: steps here
                if not lean:
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
        for h in hooks:
            h.remove()
        model.eval()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    stopped = None
    if early_stop is not None:
        if not early_stop.history or early_stop.history[-1][0] != len(losses):
            early_stop.check(len(losses))  # the weights as the run left them
        stopped = {"eval_every": EVAL_EVERY, "patience": PATIENCE,
                   **({"armed_below_rate": ARMED_BELOW} if cosine else {}), "best_step": early_stop.best_step,
                   "best_held_out_loss": round(early_stop.best, 6), "restored_best": early_stop.restore(),
                   "held_out_losses": early_stop.history}
    done = len(losses)
    head, tail = losses[: max(1, done // 10)], losses[-max(1, done // 10):]
    record = {"steps": done, "lr": lr, "lr_schedule": "cosine" if cosine else "constant", "l1": l1,
              "optimizer": "adafactor, stepped in the backward pass" if lean else "adam",
              "target": "teacher" if teacher is not None else "noise",
              "seconds": round(time.monotonic() - t0, 1),
              "train_loss_first": round(sum(head) / len(head), 6) if losses else None,
              "train_loss_last": round(sum(tail) / len(tail), 6) if losses else None}
    if stopped is not None:
        record["early_stop"] = stopped
    return masks, record


def _cosine(step: int, steps: int, minutes: float | None, elapsed: float, engine: Engine) -> float:
    """The learning rate's factor at `step`: a half cosine over the part of the run done, by steps or by the
    wall-time budget, whichever is further (the ranks' mean elapsed time: every rank steps with the same rate)."""
    done = step / steps
    if minutes:
        done = max(done, engine.total(elapsed)[0] / engine.world / (60 * minutes))
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _step_now(p: torch.Tensor, lr: float):
    """Adafactor for `p` and the hook that steps it as soon as its gradient is complete. A conv kernel is stepped as
    a 2-D view: torch's Adafactor factors a tensor's last two axes, which for [out, in, 3, 3] keeps two thirds of its
    size as state (1.4 GiB at SD-1.5 size); on [out * in, 9] it is a ninth (each kernel keeps its own row, as the
    unfactored rate nearly does), a 1x1 kernel going as [out, in]."""
    w = p.detach()
    if w.dim() > 2:
        w = w.view(-1, w.shape[-2] * w.shape[-1]) if w.shape[-2] * w.shape[-1] > 1 else w.view(w.shape[0], -1)
    view = torch.nn.Parameter(w, requires_grad=False)
    opt = torch.optim.Adafactor([view], lr=lr)

    def hook(param):
        view.grad = param.grad.view(view.shape)
        opt.step()  # in place on `view`, whose storage is the parameter's
        view.grad = None
        param.grad = None

    return opt, hook


def _finite(weights) -> bool:
    """fp16: whether this step's gradients are usable (GradScaler skips the step otherwise; so does the hook)."""
    return all(bool(torch.isfinite(w.grad).all()) for w in weights.values() if w.grad is not None)


DISTILL_LR = 2e-3  # the demo UNet's own training rate; decayed along a half cosine
LEAN_LR = 1e-2  # Adafactor's (torch's default): relative to each weight's RMS, where Adam's rate is absolute
FEATURE_WEIGHT = 1.0  # BK-SDM's weight of the feature loss beside the output's
POOL_DRAWS = 2000  # training draws whose teacher outputs a lean distillation records at most (one teacher call each;
# on the demo at --speedup 2, 64 draws cycled left FD ratio 2.09, 2000 left 1.40, the standard distillation 1.04)
RECORD_SHARE = 0.25  # of --recovery-minutes the recording may take (about a teacher call's share of a standard step)


def lean_distillation(unet, engine: Engine = LOCAL) -> bool:
    """Whether structured recovery of `unet` distils lean (module docstring): a large UNet in one CPU process."""
    from tinyprune import config

    return config.large_unet(unet) and engine.device.type == "cpu" \
        and engine.world == 1


@dataclass(frozen=True)
class RecordedTeacher:
    """The dense UNet's outputs, recorded before surgery, as the target (`noise`) of each batch: `train`, the
    training draws in the order the steps take them; `held`, the held-out draws; `whole`, the calibration batches;
    `seconds`, the recording's time."""

    train: list[Batch]
    held: list[Batch]
    whole: list[Batch]
    seconds: float


@torch.no_grad()
def record_teacher(teacher, batches: list[Batch], *, scheduler, steps: int, minutes: float | None = None,
                   seed: int = 0, early_stop: bool = True, log=lambda msg: None) -> RecordedTeacher:
    """The teacher's outputs on what a lean distillation of `steps` steps reads: its first min(steps, POOL_DRAWS)
    training draws (recover's own draws, from the same seed; with `minutes`, those recorded within RECORD_SHARE of
    them), the held-out draws and the calibration batches."""
    t0 = time.monotonic()
    train, held = _held_out(batches, scheduler, seed) if early_stop else (batches, [])

    def label(b):
        return Batch(b.x_t, b.t, b.cond, teacher(b.x_t, b.t, **b.cond).sample.float(), b.x0)

    fixed = [label(b) for b in held], [label(b) for b in batches]
    g = torch.Generator().manual_seed(seed)
    draws = []
    for s in range(min(steps, POOL_DRAWS)):
        if draws and minutes is not None and time.monotonic() - t0 > 60 * minutes * RECORD_SHARE:
            break
        draws.append(label(renoise(train[s % len(train)], scheduler, g)))
    out = RecordedTeacher(draws, *fixed, seconds=time.monotonic() - t0)
    log(f"recovery: teacher outputs recorded on {len(draws)} training draws, {len(held)} held-out and "
        f"{len(batches)} calibration batches in {out.seconds:.0f} s (lean distillation: no teacher in memory)")
    return out


def _held_out(batches: list[Batch], scheduler, seed: int) -> tuple[list[Batch], list[Batch]]:
    """Training batches and held-out batches at fixed noise and timesteps: the last of >= 4 calibration batches
    is held out; with fewer, all are used for training and held-out draws of them judge the stop."""
    g = torch.Generator().manual_seed(seed + 7919)
    train, held = (batches[:-1], batches[-1:]) if len(batches) >= 4 else (batches, batches)
    return train, [renoise(b, scheduler, g) for b in held for _ in range(HELD_OUT_DRAWS)]


def distill(student, teacher, batches, *, scheduler, steps: int, minutes: float | None = None,
            lr: float | None = None, seed: int = 0, feature_weight: float = FEATURE_WEIGHT, early_stop: bool = True,
            log=lambda msg: None, engine: Engine = LOCAL) -> dict:
    """Structured recovery: `recover` with the dense UNet as teacher and no masks, output and feature
    distillation, the early stop on held-out batches; returns the record the plan and the report show, with the
    distillation loss on the calibration batches before and after. `teacher`: the dense UNet, or its
    RecordedTeacher (lean: output distillation by Adafactor, `lr` LEAN_LR unless given, the recording's time counted
    in `minutes`)."""
    lean = isinstance(teacher, RecordedTeacher)
    if lean and minutes is not None:
        minutes = max(minutes - teacher.seconds / 60, minutes * (1 - RECORD_SHARE))
    lr = lr if lr is not None else LEAN_LR if lean else DISTILL_LR
    with tempfile.TemporaryDirectory(prefix="tinyprune-best-") as tmp:
        if lean:
            feature_weight = 0.0

            def judge(bs):
                return mean_loss(student, bs, engine=engine)

            train, held, whole = teacher.train, teacher.held, teacher.whole
        else:
            def judge(bs):
                return mean_loss(student, bs, _distill_loss(teacher), engine)

            train, held = _held_out(batches, scheduler, seed) if early_stop else (batches, [])
            whole = batches
        loss_before = judge(whole)
        stop = EarlyStop(student, lambda: judge(held), Path(tmp) / "best.bin" if lean else None) if early_stop else None
        _, rec = recover(student, {}, train, steps, scheduler=scheduler, lr=lr, seed=seed,
                         teacher=None if lean else teacher, minutes=minutes, feature_weight=feature_weight,
                         early_stop=stop, cosine=True, drawn=lean, lean=lean, log=log, engine=engine)
        loss_after = judge(whole)
    stopped = rec.get("early_stop")
    log(f"recovery: {rec['steps']} distillation steps in {rec['seconds']:.0f} s, loss vs dense "
        f"{loss_before:.5f} -> {loss_after:.5f}"
        + (f"; held-out loss best at step {stopped['best_step']} ({stopped['best_held_out_loss']:.5f})"
           + (", those weights restored" if stopped["restored_best"] else "") if stopped else ""))
    out = {"steps": rec["steps"], "requested_steps": steps, "minutes": minutes, "lr": lr,
           "lr_schedule": rec["lr_schedule"], "optimizer": rec["optimizer"], "seconds": rec["seconds"],
           "objective": "distillation (MSE to the dense UNet's output"
                        + (f" + {feature_weight:g} x the stage blocks' feature MSE" if feature_weight else "") + ")",
           "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6)}
    if lean:
        out["teacher"] = (f"outputs recorded before surgery on {len(train)} training draws in "
                          f"{teacher.seconds:.0f} s, cycled (lean: a UNet past config.LARGE_UNET_BYTES)")
    if stopped is not None:
        out["early_stop"] = dict(stopped, held_out=(f"calibration batch {len(batches)} of {len(batches)}"
                                                    if len(batches) >= 4 else "fixed draws of every batch"))
    return out


def _distill_loss(teacher):
    def forward(student, b: Batch) -> torch.Tensor:
        target = teacher(b.x_t, b.t, **b.cond).sample.float()
        return F.mse_loss(student(b.x_t, b.t, **b.cond).sample.float(), target)

    return forward
