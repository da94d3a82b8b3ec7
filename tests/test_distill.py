"""Structured recovery: BK-SDM's output + feature distillation from the dense UNet, and the early stop on a
held-out loss that keeps the best weights."""

import copy
import math

import pytest
import torch

from tinyprune.model.calibration import CalibrationSet
from tinyprune.prune import recovery as R
from pipelines import tiny as tiny_pipeline

torch.set_num_threads(2)


def _batches(pipe, n, size=2):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randn(n, 4, 8, 8, generator=g), pipe.family.check_conditions(n), "test").batches(pipe, size)


def _student_teacher():
    pipe = tiny_pipeline(seed=0)
    teacher = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    with torch.no_grad():  # a student off the teacher, with the same shapes
        for p in pipe.unet.parameters():
            p.mul_(0.9)
    return pipe, pipe.unet, teacher


def test_block_outputs_are_the_stage_blocks_in_call_order():
    pipe, student, teacher = _student_teacher()
    feats = []
    b = _batches(pipe, 2)[0]
    with torch.no_grad(), R.block_outputs(student, feats):
        student(b.x_t, b.t, **b.cond)
    n = len(student.down_blocks) + 1 + len(student.up_blocks)
    assert len(feats) == n and feats[-1].shape[1] == student.config.block_out_channels[0]
    with torch.no_grad(), R.block_outputs(student, []):  # hooks gone after the block: nothing more collected
        student(b.x_t, b.t, **b.cond)
    assert len(feats) == n and not student.down_blocks[0]._forward_hooks


def test_feature_distillation_changes_the_update():
    out = {}
    for w in (0.0, 1.0):
        pipe, student, teacher = _student_teacher()
        R.recover(student, {}, _batches(pipe, 4), 3, scheduler=pipe.noise_scheduler, teacher=teacher, feature_weight=w)
        out[w] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert not torch.equal(out[0.0], out[1.0])
    pipe, student, teacher = _student_teacher()
    rec = R.distill(student, teacher, _batches(pipe, 4), scheduler=pipe.noise_scheduler, steps=2)
    assert "feature MSE" in rec["objective"]
    assert rec["early_stop"]["held_out"] == "fixed draws of every batch"  # 2 batches: none to spare


def test_early_stop_ends_a_run_that_stopped_gaining(monkeypatch):
    monkeypatch.setattr(R, "PATIENCE", 1)
    pipe, student, teacher = _student_teacher()
    rec = R.distill(student, teacher, _batches(pipe, 8), scheduler=pipe.noise_scheduler, steps=200, lr=0.0)
    s = rec["early_stop"]
    # lr 0: no evaluation after the first gains anything, but the stop counts only once the decaying rate is under
    # a tenth of its start: after step 159 of 200 (cos(pi * 159/200) < -0.8), so at the evaluation of step 175
    assert rec["steps"] == 175 and s["best_step"] == 0 and s["armed_below_rate"] == R.ARMED_BELOW == 0.1
    assert [h[0] for h in s["held_out_losses"]] == list(range(0, 176, R.EVAL_EVERY)) and s["patience"] == 1
    assert s["held_out"] == "calibration batch 4 of 4"  # 8 samples, batches of 2: the last batch held out


def test_early_stop_restores_the_best_weights():
    pipe, student, teacher = _student_teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rec = R.distill(student, teacher, _batches(pipe, 8), scheduler=pipe.noise_scheduler, steps=R.EVAL_EVERY, lr=5.0)
    s = rec["early_stop"]  # an lr that wrecks the student: the weights it started with were the best
    assert s["best_step"] == 0 and s["restored_best"] is True
    last = s["held_out_losses"][-1][1]
    assert last is None or last > s["best_held_out_loss"]  # None: the loss diverged
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert rec["loss_after"] == pytest.approx(rec["loss_before"])


def test_the_learning_rate_decays_along_a_half_cosine_over_steps_or_minutes():
    from tinyprune.prune.distributed import LOCAL

    assert R._cosine(0, 100, None, 999.0, LOCAL) == 1.0
    assert R._cosine(50, 100, None, 0.0, LOCAL) == pytest.approx(0.5)
    assert R._cosine(100, 100, None, 0.0, LOCAL) == pytest.approx(0.0)
    # a wall-time budget further along than the steps paces the decay: 45 s of 1 minute is 3/4 of the run
    assert R._cosine(10, 100, 1.0, 45.0, LOCAL) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert R._cosine(90, 100, 10.0, 45.0, LOCAL) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))


def test_distillation_decays_its_learning_rate_and_says_so():
    """Structured recovery steps with a cosine-decayed rate: the same run at a constant rate ends elsewhere."""
    ends = {}
    for cosine in (False, True):
        pipe, student, teacher = _student_teacher()
        _, rec = R.recover(student, {}, _batches(pipe, 4), 6, scheduler=pipe.noise_scheduler, teacher=teacher,
                           lr=1e-2, cosine=cosine)
        assert rec["lr_schedule"] == ("cosine" if cosine else "constant")
        ends[cosine] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert not torch.equal(ends[False], ends[True])
    pipe, student, teacher = _student_teacher()
    rec = R.distill(student, teacher, _batches(pipe, 4), scheduler=pipe.noise_scheduler, steps=2)
    assert rec["lr_schedule"] == "cosine" and rec["lr"] == R.DISTILL_LR


def test_a_constant_rate_run_stops_early_from_the_start(monkeypatch):
    """The armed rule belongs to the decaying rate: at a constant rate the held-out stop counts from the start."""
    monkeypatch.setattr(R, "PATIENCE", 1)
    pipe, student, teacher = _student_teacher()
    held = _batches(pipe, 2)
    stop = R.EarlyStop(student, lambda: R.mean_loss(student, held))
    _, rec = R.recover(student, {}, _batches(pipe, 4), 200, scheduler=pipe.noise_scheduler, teacher=teacher, lr=0.0,
                       early_stop=stop)
    assert rec["steps"] == R.EVAL_EVERY and "armed_below_rate" not in rec["early_stop"]


def test_a_recorded_teacher_holds_the_teachers_outputs_on_the_standard_draws():
    """Lean distillation's targets: the dense UNet's outputs on the very draws the standard run makes."""
    pipe, student, teacher = _student_teacher()
    batches = _batches(pipe, 8)
    rec = R.record_teacher(teacher, batches, scheduler=pipe.noise_scheduler, steps=5, seed=3)
    train, held = R._held_out(batches, pipe.noise_scheduler, 3)
    g = torch.Generator().manual_seed(3)
    assert len(rec.train) == 5 and len(rec.held) == R.HELD_OUT_DRAWS and len(rec.whole) == len(batches)
    with torch.no_grad():
        for s, b in enumerate(rec.train):
            want = R.renoise(train[s % len(train)], pipe.noise_scheduler, g)
            assert torch.equal(b.x_t, want.x_t) and torch.equal(b.t, want.t)
            assert torch.equal(b.noise, teacher(b.x_t, b.t, **b.cond).sample)
    assert all(torch.equal(a.x_t, b.x_t) for a, b in zip(rec.held, held))
    assert R.POOL_DRAWS == 2000  # (the whole default run's draws)
    # a wall-time budget: the recording takes at most its RECORD_SHARE (here: one draw, then the budget is spent)
    assert len(R.record_teacher(teacher, batches, scheduler=pipe.noise_scheduler, steps=50, minutes=1e-9).train) == 1
    # the loss it judges is the standard path's: the student against the teacher on the calibration batches
    assert R.mean_loss(student, rec.whole) == pytest.approx(R.mean_loss(student, batches, R._distill_loss(teacher)))


def test_lean_distillation_steps_adafactor_in_the_backward_and_gains():
    pipe, student, teacher = _student_teacher()
    batches = _batches(pipe, 8)
    # (this toy student sits near its teacher: a small rate shows the gain, 0.00665 -> 0.00175 when written)
    rec = R.distill(student, R.record_teacher(teacher, batches, scheduler=pipe.noise_scheduler, steps=40),
                    batches, scheduler=pipe.noise_scheduler, steps=40, early_stop=False, lr=1e-3)
    assert rec["optimizer"].startswith("adafactor") and rec["steps"] == 40
    assert "recorded before surgery on 40 training draws" in rec["teacher"] and "feature" not in rec["objective"]
    assert rec["loss_after"] < 0.5 * rec["loss_before"]
    assert all(p.grad is None for p in student.parameters())
    # the stepping hooks are gone with the run: a backward now only leaves gradients
    before = [p.detach().clone() for p in student.parameters()]
    b = batches[0]
    student.requires_grad_(True)
    student(b.x_t, b.t, **b.cond).sample.square().mean().backward()
    assert all(torch.equal(a, p) for a, p in zip(before, student.parameters()))
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_lean_early_stop_restores_the_best_weights_from_disk():
    pipe, student, teacher = _student_teacher()
    batches = _batches(pipe, 8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    recorded = R.record_teacher(teacher, batches, scheduler=pipe.noise_scheduler, steps=R.EVAL_EVERY)
    rec = R.distill(student, recorded, batches, scheduler=pipe.noise_scheduler, steps=R.EVAL_EVERY, lr=50.0)
    s = rec["early_stop"]  # a rate that wrecks the student: the weights it started with were the best
    assert s["best_step"] == 0 and s["restored_best"] is True
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_only_a_large_unet_distils_lean(monkeypatch):
    from tinyprune.prune.distributed import LOCAL

    pipe = tiny_pipeline(seed=0)
    assert not R.lean_distillation(pipe.unet, LOCAL)
    monkeypatch.setattr("tinyprune.config.LARGE_UNET_BYTES", 0)
    assert R.lean_distillation(pipe.unet, LOCAL)


def test_lean_steps_keep_factored_state_for_conv_kernels():
    """A conv kernel [out, in, k, k] is stepped as [out*in, k*k]: Adafactor's state is a row and a column of that."""
    conv = torch.nn.Conv2d(64, 32, 3)
    before = conv.weight.detach().clone()
    opt, hook = R._step_now(conv.weight, 1e-2)
    conv.weight.register_post_accumulate_grad_hook(hook)
    conv(torch.randn(2, 64, 8, 8)).square().mean().backward()
    assert conv.weight.grad is None and not torch.equal(conv.weight, before)  # stepped in the backward
    state = next(iter(opt.state.values()))
    held = sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    assert held == 32 * 64 + 9  # a row per kernel and a column per tap (torch's own [.., 3, 3] factoring: 2/3 of it)
    one = torch.nn.Conv2d(64, 32, 1)
    opt, hook = R._step_now(one.weight, 1e-2)
    one.weight.register_post_accumulate_grad_hook(hook)
    one(torch.randn(2, 64, 4, 4)).square().mean().backward()
    assert sum(v.numel() for v in next(iter(opt.state.values())).values() if torch.is_tensor(v) and v.dim() > 0) \
        == 32 + 64  # a 1x1 kernel: [out, in]
