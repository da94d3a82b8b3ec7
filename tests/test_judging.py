"""The judging results on exact numbers, at and around each boundary: drift, image drift, PSNR, quality, budgets.

Fast and torch-free: the mutation run (benchmarks/mutation.py) selects this file with test_claims_fail.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyprune.judge.drift import Drift, ImageDrift, finite_or_none, psnr
from tinyprune.judge.gates import LatencyBudget, QualityResult


def test_psnr_on_known_errors():
    a = np.zeros((2, 3), np.float32)
    assert psnr(a, a) == math.inf
    assert psnr(a, np.full((2, 3), 0.1)) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(a, np.full((2, 3), 0.1), data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    one = a.copy()
    one[0, 0] = 0.6  # MSE = 0.36 / 6 = 0.06: the mean over every element, not the sum or the max
    assert psnr(a, one) == pytest.approx(10 * math.log10(1 / 0.06))
    with pytest.raises(ValueError, match=r"PSNR needs equal shapes, got \(2, 3\) and \(3, 2\)"):
        psnr(a, np.zeros((3, 2)))


def test_psnr_takes_tensors_in_float64():
    torch = pytest.importorskip("torch")
    a = torch.zeros(4)
    b = torch.tensor([1e-4, 0, 0, 0])
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / (1e-8 / 4)))


@pytest.mark.parametrize("max_abs, ok", [(1e-3, True), (1e-3 * (1 - 1e-9), True), (1e-3 * (1 + 1e-9), False)])
def test_drift_gates_on_max_abs_inclusive(max_abs, ok):
    d = Drift("unet.out_sample", max_abs, 0.0, 0.0, 1e-3)
    assert bool(d) is ok
    assert d.failures() == ([] if ok else ["unet.out_sample"])
    assert d.to_dict() == {"name": "unet.out_sample", "max_abs": max_abs, "mean_abs": 0.0, "max_rel": 0.0,
                           "tolerance": 1e-3, "ok": ok}


def test_drift_of_arrays():
    ref = np.array([[1.0, -2.0], [0.0, 4.0]], np.float32)
    got = np.array([[1.5, -2.0], [1e-7, 3.0]], np.float32)
    d = Drift.of("x", ref, got, 0.6)
    assert d.max_abs == pytest.approx(1.0) and d.mean_abs == pytest.approx((0.5 + 0 + 1e-7 + 1.0) / 4)
    # relative to |ref|, floored at 1e-6 so a zero reference does not divide by zero
    assert d.max_rel == pytest.approx(max(0.5 / 1.0, 1e-7 / 1e-6, 1.0 / 4.0))
    assert d.tolerance == 0.6 and not d and d.failures() == ["x"]
    assert Drift.of("x", ref, got, 1.0)


@pytest.mark.parametrize("psnr_db, ok", [(30.0, True), (30.0 + 1e-9, True), (30.0 - 1e-9, False)])
def test_image_drift_gates_on_psnr_inclusive(psnr_db, ok):
    d = ImageDrift("image dense vs pruned", psnr_db, 0.25, 30.0)
    assert bool(d) is ok and d.skipped is False and d.reason is None
    assert d.failures() == ([] if ok else ["image dense vs pruned"])
    assert d.to_dict() == {"name": "image dense vs pruned", "psnr_db": psnr_db, "max_abs": 0.25, "min_psnr_db": 30.0,
                           "ok": ok, "skipped": False, "reason": None}


def test_image_drift_of_arrays_and_identical_images():
    ref = np.zeros((1, 3, 2, 2), np.float32)
    got = ref.copy()
    got[0, 0, 0, 0] = 0.5
    d = ImageDrift.of("img", ref, got, 14.0)
    assert d.max_abs == 0.5 and d.psnr_db == pytest.approx(10 * math.log10(12 / 0.25))
    same = ImageDrift.of("img", ref, ref, 1e9)
    assert same.psnr_db == math.inf and same and same.to_dict()["psnr_db"] is None and same.max_abs == 0.0


def test_skipped_image_drift_applies_no_gate():
    d = ImageDrift.skip("image runtime", 30.0, "--image-checks 0")
    assert d and d.skipped and d.failures() == [] and (d.psnr_db, d.max_abs, d.min_psnr_db) == (None, None, 30.0)
    assert d.to_dict()["reason"] == "--image-checks 0" and d.to_dict()["ok"] is True


@pytest.mark.parametrize("x, want", [(1.5, 1.5), (0.0, 0.0), (-2.0, -2.0), (math.inf, None), (-math.inf, None),
                                     (math.nan, None), (None, None)])
def test_finite_or_none(x, want):
    assert finite_or_none(x) == want


def _q(pruned_fd=11.0, dense_fd=10.0, accuracy=0.9, max_fd_ratio=1.1, min_accuracy=0.9, psnr_db=25.0):
    return QualityResult(n_samples=100, dense_fd=dense_fd, pruned_fd=pruned_fd, dense_accuracy=0.99,
                         pruned_accuracy=accuracy, psnr_db=psnr_db, ssim=0.9, max_fd_ratio=max_fd_ratio,
                         min_accuracy=min_accuracy)


def test_quality_fd_ratio_gate_is_inclusive():
    assert _q(pruned_fd=11.0).fd_ratio == pytest.approx(1.1) and _q(pruned_fd=10.999).fd_ok
    assert _q(pruned_fd=11.0, max_fd_ratio=1.1000001).fd_ok
    assert not _q(pruned_fd=11.001).fd_ok and _q(pruned_fd=11.001).failures() == ["FD ratio 1.100 > 1.1"]
    assert _q(dense_fd=0.0).fd_ratio == math.inf and not _q(dense_fd=0.0).fd_ok
    assert _q(dense_fd=0.0).to_dict()["fd_ratio"] is None


def test_quality_accuracy_gate_is_inclusive():
    assert _q(accuracy=0.9).accuracy_ok and _q(accuracy=0.9) and _q(accuracy=0.9).failures() == []
    low = _q(accuracy=0.8999)
    assert not low.accuracy_ok and not low and low.failures() == ["class accuracy 0.900 < 0.9"]
    both = _q(pruned_fd=20.0, accuracy=0.5)
    assert both.failures() == ["FD ratio 2.000 > 1.1", "class accuracy 0.500 < 0.9"]
    assert not _q(pruned_fd=20.0) and not _q(accuracy=0.5)


def test_quality_to_dict():
    d = _q(pruned_fd=12.0, psnr_db=math.inf).to_dict()
    assert d == {"n_samples": 100, "dense": {"fd": 10.0, "accuracy": 0.99}, "pruned": {"fd": 12.0, "accuracy": 0.9},
                 "fd_ratio": pytest.approx(1.2), "psnr_db": None, "ssim": 0.9, "max_fd_ratio": 1.1,
                 "min_accuracy": 0.9, "fd_ok": False, "accuracy_ok": True, "ok": False}
    assert _q(psnr_db=21.5).to_dict()["psnr_db"] == 21.5


@pytest.mark.parametrize("p50, ok", [(200.0, True), (199.9, True), (200.1, False)])
def test_latency_budget_is_inclusive(p50, ok):
    b = LatencyBudget("unet", 200.0, p50)
    assert bool(b) is ok
    assert b.failures() == ([] if ok else [f"unet p50 {p50:.3g} ms > 200 ms"])
    assert b.to_dict() == {"budget_ms": 200.0, "p50_ms": p50, "ok": ok}


def test_psnr_is_computed_in_float64_on_any_input():
    a, b = np.array([10, 250], np.uint8), np.array([250, 10], np.uint8)  # uint8 arithmetic would wrap around
    assert psnr(a, b, data_range=255.0) == pytest.approx(10 * math.log10(255.0**2 / 240.0**2))
    assert psnr(np.array([0.5, 0.25]), np.array([0.25, 0.5])) == pytest.approx(10 * math.log10(1 / 0.0625))
    torch = pytest.importorskip("torch")
    t = torch.ones(3, requires_grad=True)  # a tensor that needs detach() before numpy sees it
    assert psnr(t, torch.zeros(3)) == pytest.approx(0.0)


def test_drift_and_image_drift_keep_their_names_and_floors():
    ref = np.array([0.0, 1.0], np.float32)
    d = Drift.of("unet.out_sample", ref, np.array([1e-3, 1.0], np.float32), 1.0)
    assert d.name == "unet.out_sample" and d.max_rel == pytest.approx(1e-3 / 1e-6)  # floor 1e-6 under a zero reference
    img = ImageDrift.of("img", np.full((1, 3, 2, 2), 0.5, np.float32), np.full((1, 3, 2, 2), 0.75, np.float32), 1.0)
    assert img.name == "img" and img.max_abs == pytest.approx(0.25) and img.psnr_db == pytest.approx(12.0412, 1e-4)
    assert ImageDrift.skip("image runtime", 30.0, "why").name == "image runtime"
    assert _q(pruned_fd=10.0).to_dict()["ok"] is True


# ------------------------------------------------------------------ the yardstick's gates (gates.py)
def _pipe(side=32, vae_out=3, unet_out=3, conditions=("x",), vae=True):
    from types import SimpleNamespace as NS

    family = NS(name="fam", yardstick_conditions=lambda digits: None if conditions is None else list(conditions))
    return NS(family=family, latent_size=side // 4 if vae else side, vae_scale=4 if vae else 1,
              vae=NS(config=NS(out_channels=vae_out)) if vae else None, unet=NS(config=NS(out_channels=unet_out)))


def test_yardstick_applies_to_prompted_rgb_pipelines_of_the_classifiers_size_or_multiples():
    from tinyprune.judge.gates import applies

    assert applies(_pipe(32)) is None and applies(_pipe(64)) is None
    assert applies(_pipe(48)) == "the pipeline makes 48x48 images, the digit classifier reads 32x32 RGB (or multiples)"
    assert applies(_pipe(32, vae_out=1)) == ("the pipeline makes 32x32 images, the digit classifier reads 32x32 RGB "
                                             "(or multiples)")
    assert applies(_pipe(32, conditions=None)) == "a fam pipeline cannot be asked for a digit (the yardstick needs prompts)"
    assert applies(_pipe(32, vae=False, unet_out=3)) is None  # pixel space: the UNet's channels are the image's
    assert applies(_pipe(32, vae=False, unet_out=1)) is not None


def test_quality_gates_run_on_the_demo_by_default_and_elsewhere_on_request():
    from tinyprune.judge.gates import why_skipped

    assert why_skipped(_pipe(32), 0, True) == "--quality 0"
    assert why_skipped(_pipe(32), None, False) == ("they apply to the demo pipeline by default; --quality N applies the "
                                                   "digit yardstick to this one")
    assert why_skipped(_pipe(32), None, True) is None and why_skipped(_pipe(32), 3, False) is None
    assert why_skipped(_pipe(48), 3, False).startswith("the pipeline makes 48x48")
    assert why_skipped(_pipe(48), None, True).startswith("the pipeline makes 48x48")


def test_draw_asks_for_every_digit_per_class_times(monkeypatch):
    import tinyprune.judge.quality as quality
    from tinyprune.judge.gates import QUALITY_SEED, draw

    calls = []
    monkeypatch.setattr(quality, "conditions_for", lambda pipe, labels: [f"{pipe} digit {d}" for d in labels])
    monkeypatch.setattr(quality, "generate", lambda pipe, labels, seed, steps: calls.append((pipe, labels, seed, steps))
                        or np.zeros((len(labels), 3, 2, 2)))
    s = draw("P", 2, steps=3, seed=7)
    assert s.labels == list(range(10)) * 2 and s.conditions == [f"P digit {d}" for d in s.labels]
    assert calls == [("P", s.labels, 7, 3)] and s.images.shape == (20, 3, 2, 2)
    draw("P", 1)
    assert calls[-1][2:] == (QUALITY_SEED, 20)


@pytest.fixture(scope="module")
def yardstick():
    from tinyprune.judge.quality import class_accuracy, features, frechet_distance, load_classifier, real_digits

    clf = load_classifier()
    images, labels = real_digits()
    return clf, images, labels, features(clf, images), frechet_distance, class_accuracy


def test_judge_scores_both_sides_against_the_held_out_digits(yardstick):
    from tinyprune.config import load_profile
    from tinyprune.judge.gates import Samples, judge
    from tinyprune.judge.quality import ssim

    clf, images, labels, real, fd, acc = yardstick
    dense = Samples(labels[:60].tolist(), ["p"] * 60, images[:60])
    noisy = np.clip(images[60:120] + 0.3 * np.random.default_rng(0).standard_normal(images[60:120].shape), 0, 1)
    pruned = Samples(labels[60:120].tolist(), ["p"] * 60, noisy.astype(np.float32))
    profile = load_profile("x86-cpu")
    r = judge(dense, pruned, profile)
    from tinyprune.judge.quality import features

    assert r.n_samples == 60
    assert r.dense_fd == pytest.approx(fd(features(clf, dense.images), real))
    assert r.pruned_fd == pytest.approx(fd(features(clf, pruned.images), real))
    assert r.dense_fd < r.pruned_fd
    assert r.dense_accuracy == acc(clf, dense.images, dense.labels) and r.dense_accuracy > 0.9
    assert r.pruned_accuracy == acc(clf, pruned.images, pruned.labels)
    assert r.psnr_db == pytest.approx(psnr(dense.images, pruned.images)) and r.ssim == pytest.approx(
        ssim(dense.images, pruned.images))
    assert (r.max_fd_ratio, r.min_accuracy) == (profile.max_fd_ratio, profile.min_accuracy)
    o = judge(dense, pruned, profile, max_fd_ratio=9.5, min_accuracy=0.25)
    assert (o.max_fd_ratio, o.min_accuracy) == (9.5, 0.25)


def test_write_grid_is_the_captioned_grid_of_the_first_columns(tmp_path, yardstick):
    from tinyprune.judge.gates import Samples, write_grid
    from tinyprune.judge.quality import sample_grid

    _, images, labels, *_ = yardstick
    dense = Samples(labels[:12].tolist(), [f"prompt {i}" for i in range(12)], images[:12])
    pruned = Samples(labels[:12].tolist(), [f"prompt {i}" for i in range(12)], images[12:24])
    got = write_grid(dense, pruned, tmp_path / "g.png", columns=4)
    want = sample_grid(images[:4], images[12:16], tmp_path / "w.png", captions=["prompt 0", "prompt 1", "prompt 2",
                                                                               "prompt 3"])
    assert got == tmp_path / "g.png" and got.read_bytes() == want.read_bytes()
    default = write_grid(dense, pruned, tmp_path / "d.png")
    ten = sample_grid(images[:10], images[12:22], tmp_path / "t.png", captions=[f"prompt {i}" for i in range(10)])
    assert default.read_bytes() == ten.read_bytes()
