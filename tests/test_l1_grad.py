"""l1-grad: scores, the iterative schedule with regrowth, L1 recovery, options and CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.model.calibration import CalibrationSet
from tinyprune.config import DEFAULT_RECOVERY_STEPS, L1GradSpec, PruneSpec, load_profile
from tinyprune.errors import InputError
from tinyprune.prune.importance.l1_grad import gradient_magnitudes, l1_grad_scores, prune_l1_grad, ramp
from tinyprune.prune.importance.magnitude import magnitude
from tinyprune.prune.masks import prunable_weights, unstructured
from pipelines import tiny as tiny_pipeline
from tinyprune.prune.recovery import mean_loss, recover

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipe_and_batches():
    pipe = tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(1)
    cal = CalibrationSet(torch.randn(8, 4, 8, 8, generator=g), pipe.family.check_conditions(8), "test")
    return pipe, cal.batches(pipe, batch_size=4, seed=0)


def _fresh(pipe_and_batches):
    """A fresh copy of the fixture's dense UNet (tests prune in place)."""
    pipe, batches = pipe_and_batches
    return tiny_pipeline(seed=0).unet, batches, pipe.scheduler


def _zeros(model):
    return sum(int((w == 0).sum()) for w in prunable_weights(model).values())


def test_beta_zero_is_magnitude_ranking(pipe_and_batches):
    unet, batches, _ = _fresh(pipe_and_batches)
    weights = prunable_weights(unet)
    grads = gradient_magnitudes(unet, batches)
    scores = l1_grad_scores(weights, grads, alpha=1.0, beta=0.0)
    for s in (0.1, 0.43, 0.7):
        a, b = unstructured(scores, s), unstructured(dict(magnitude(weights)), s)
        assert all(torch.equal(a[n], b[n]) for n in weights), s


def test_beta_positive_changes_the_ranking(pipe_and_batches):
    unet, batches, _ = _fresh(pipe_and_batches)
    weights = prunable_weights(unet)
    grads = gradient_magnitudes(unet, batches)
    n = sum(w.numel() for w in weights.values())
    assert all(g.shape == weights[k].shape and bool((g >= 0).all()) for k, g in grads.items())
    l1g = unstructured(l1_grad_scores(weights, grads, 1.0, 1.0), 0.43)
    mag = unstructured(dict(magnitude(weights)), 0.43)
    differ = sum(int((l1g[k] != mag[k]).sum()) for k in weights)
    assert differ > 0.01 * n  # β > 0 moves more than 1 % of the decisions
    # and it moves them towards high-gradient weights: the kept set carries more gradient mass
    kept_grad = lambda m: sum(float(grads[k][m[k]].sum()) for k in weights)  # noqa: E731
    assert kept_grad(l1g) > kept_grad(mag)
    # the normalisation: each term has mean 1 over all prunable weights
    only_g = l1_grad_scores(weights, grads, 0.0, 1.0)
    assert sum(float(s.sum()) for s in only_g.values()) / n == pytest.approx(1.0, rel=1e-4)


def test_ramp_ends_exactly_at_target():
    assert [round(ramp(0.43, k, 4), 6) for k in range(1, 5)] == [0.248594, 0.37625, 0.423281, 0.43]
    assert ramp(0.43, 1, 1) == 0.43


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_schedule_exact_count_and_regrowth(pipe_and_batches, scope):
    unet, batches, scheduler = _fresh(pipe_and_batches)
    weights = prunable_weights(unet)
    n = sum(w.numel() for w in weights.values())
    masks, info = prune_l1_grad(unet, batches, 0.43, scheduler=scheduler, recovery_steps=6, iterations=3,
                                scope=scope, lr=1e-3)
    if scope == "global":
        assert _zeros(unet) == round(0.43 * n)
    else:
        for name, w in weights.items():
            assert int((w == 0).sum()) == round(0.43 * w.numel()), name
    for name, w in weights.items():  # the masks are what the weights hold
        assert bool((w[~masks[name]] == 0).all()) and bool((w[masks[name]] != 0).all()), name
    steps = info["schedule"]
    assert [s["sparsity"] for s in steps] == [round(ramp(0.43, k, 3), 6) for k in (1, 2, 3)]
    assert [s["recovery"]["steps"] for s in steps] == [2, 2, 2]
    # weights pruned at one step came back at a later one, and the record adds up
    assert info["regrown"] > 0
    assert info["regrown"] == sum(s["regrown_at_prune"] + s["regrown_in_recovery"] for s in steps)
    assert steps[0]["regrown_at_prune"] == 0


def test_schedule_without_recovery_still_regrows(pipe_and_batches):
    unet, batches, scheduler = _fresh(pipe_and_batches)
    n = sum(w.numel() for w in prunable_weights(unet).values())
    _, info = prune_l1_grad(unet, batches, 0.5, scheduler=scheduler, recovery_steps=0, iterations=3)
    assert _zeros(unet) == round(0.5 * n)
    assert info["regrown"] == sum(s["regrown_at_prune"] for s in info["schedule"]) > 0


def test_recovery_holds_masks_and_l1_shrinks(pipe_and_batches):
    results = {}
    for l1 in (0.0, 1e-2):
        unet, batches, scheduler = _fresh(pipe_and_batches)
        weights = prunable_weights(unet)
        masks = unstructured(dict(magnitude(weights)), 0.5)
        with torch.no_grad():
            for k, w in weights.items():
                w.mul_(masks[k])
        zeros = _zeros(unet)
        out, log = recover(unet, masks, batches, 6, scheduler=scheduler, lr=1e-3, l1=l1)
        assert out is masks and _zeros(unet) == zeros  # no weight came back
        results[l1] = sum(float(w.abs().sum()) for w in weights.values())
        assert log["steps"] == 6 and log["l1"] == l1
    assert results[1e-2] < results[0.0]


def test_distill_target_is_the_teacher(pipe_and_batches):
    import copy

    unet, batches, scheduler = _fresh(pipe_and_batches)
    teacher = copy.deepcopy(unet)
    keep = {k: torch.ones_like(w, dtype=torch.bool) for k, w in prunable_weights(unet).items()}
    _, log = recover(unet, keep, batches, 1, scheduler=scheduler, lr=1e-3, teacher=teacher)
    assert log["target"] == "teacher" and log["train_loss_first"] < 1e-10  # student == teacher: nothing to fit
    _, log = recover(unet, keep, batches, 1, scheduler=scheduler, lr=1e-3)
    assert log["target"] == "noise" and log["train_loss_first"] > 0.1


def test_recovery_lowers_the_calibration_loss(pipe_and_batches):
    unet, batches, scheduler = _fresh(pipe_and_batches)
    weights = prunable_weights(unet)
    masks = unstructured(dict(magnitude(weights)), 0.43)
    with torch.no_grad():
        for k, w in weights.items():
            w.mul_(masks[k])
    before = mean_loss(unet, batches)
    recover(unet, masks, batches, 10, scheduler=scheduler, lr=1e-3)
    assert mean_loss(unet, batches) < before


def test_options_validated_and_defaults():
    assert L1GradSpec.parse() == L1GradSpec(1.0, 1.0, 1e-5, None, 4, 1e-4, True)
    assert not L1GradSpec.parse(recovery_target="noise").distill and L1GradSpec.parse(recovery_target="distill").distill
    for kwargs, message in [({"alpha": -1.0}, "--alpha must be a finite number >= 0"),
                            ({"alpha": 0.0, "beta": 0.0}, "--alpha and --beta are both 0"),
                            ({"iterations": 0}, "--iterations must be an integer >= 1"),
                            ({"recovery_steps": -5}, "--recovery-steps must be an integer >= 0"),
                            ({"l1": float("nan")}, "--l1 must be a finite number >= 0"),
                            ({"lr": -1.0}, "^lr must be a finite number >= 0"),  # Python API only: no --lr
                            ({"lr": 0.0}, "^lr must be > 0"),
                            ({"recovery_target": "teacher"}, "unknown --recovery-target 'teacher'; known: distill, noise")]:
        with pytest.raises(InputError, match=message):
            L1GradSpec.parse(**kwargs)
    profile = load_profile("jetson")
    spec, _ = PruneSpec.resolve("l1-grad", 0.43, "unstructured", "global", False, profile)
    assert spec.recovery_steps == DEFAULT_RECOVERY_STEPS == 200 and spec.needs_calibration
    spec, _ = PruneSpec.resolve("magnitude", 0.43, "unstructured", "global", False, profile)
    assert spec.recovery_steps == 0 and not spec.needs_calibration
    spec, _ = PruneSpec.resolve("magnitude", 0.43, "unstructured", "global", False, profile,
                                l1grad=L1GradSpec.parse(recovery_steps=7))
    assert spec.recovery_steps == 7 and spec.needs_calibration


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Eight small RGB images in class sub-folders: the --calibration path through the VAE encoder."""
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / str(i % 4)).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / str(i % 4) / f"{i}.png")
    return root


def test_cli_prune_l1_grad(tiny_dir, tmp_path, image_dir):
    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["prune", "--model", str(tiny_dir), "--method", "l1-grad", "--recovery-steps", "4",
                                 "--iterations", "2", "--beta", "2", "--calibration", str(image_dir), "--out",
                                 str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert abs(json.loads(r.stdout)["sparsity"]["unet"] - 0.43) < 1e-5
    plan = json.loads((out / "pruning_plan.json").read_text())
    g = plan["components"]["unet"]["l1_grad"]
    assert (g["beta"], g["iterations"], g["recovery_steps"], g["recovery_target"]) == (2.0, 2, 4, "distill")
    steps = g["schedule"]
    assert len(steps) == 2 and steps[0]["regrown_at_prune"] == 0  # nothing was pruned before the first step
    assert g["regrown"] == sum(s["regrown_at_prune"] + s["regrown_in_recovery"] for s in steps)
    # Step 2 re-scores with the recovered model's gradients (beta 2 weighs them heavily), so weights step 1 pruned
    # come back (58371 here), at most all that step 1 pruned (295606 of the tiny UNet's 785664).
    n = sum(w.numel() for w in prunable_weights(tiny_pipeline(seed=0).unet).values())
    assert 0 < steps[1]["regrown_at_prune"] <= round(ramp(0.43, 1, 2) * n)
    assert "calibration: 8 latents in 1 batches (images from" in r.stderr


def test_cli_bad_options(tiny_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "l1-grad", "--alpha", "-1", "--out",
                            str(tmp_path / "x")])
    assert r.exit_code == 2 and "--alpha must be a finite number >= 0" in r.stderr
    r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "l1-grad", "--calibration",
                            str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is not a directory of images" in r.stderr
    r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "l1-grad", "--recovery-target", "labels",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.stderr.strip() == "error: unknown --recovery-target 'labels'; known: distill, noise"
    assert not (tmp_path / "x").exists()
    r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "l2-grad", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "known methods: magnitude, l1-grad" in r.stderr
