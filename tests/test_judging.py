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
