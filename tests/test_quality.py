"""The quality yardstick on cases whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tinyprune.judge import quality
from tinyprune.judge.quality import frechet_distance, psnr, sample_grid, ssim, sweep_plot

torch.set_num_threads(2)


def exact_moments(rng, n, mean, cov):
    """n samples whose empirical mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    d = len(mean)
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    white = x @ np.linalg.inv(chol).T  # empirical covariance = I
    return white @ np.linalg.cholesky(cov).T + mean


def psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_fd(mu1, s1, mu2, s2):
    """Closed form W2^2 of two Gaussians, with the matrix root through eigh (not scipy's sqrtm)."""
    r1 = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


@pytest.fixture(scope="module")
def classifier():
    return quality.load_classifier()


@pytest.fixture(scope="module")
def real():
    return quality.real_digits()


# --------------------------------------------------------------------------- Fréchet distance

def test_fd_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 64)) * 3 + 1
    scale = np.trace(np.cov(feats, rowvar=False))
    assert frechet_distance(feats, feats) < 1e-6 * scale


def test_fd_of_a_shifted_set_is_the_squared_shift():
    feats = np.random.default_rng(1).standard_normal((400, 16))
    shift = np.linspace(-1, 1, 16)
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fd_matches_the_gaussian_closed_form_diagonal():
    rng = np.random.default_rng(2)
    d1, d2 = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a = exact_moments(rng, 300, mu1, np.diag(d1))
    b = exact_moments(rng, 200, mu2, np.diag(d2))
    # diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(d1) - sqrt(d2))^2
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_fd_matches_the_gaussian_closed_form_full_covariance():
    rng = np.random.default_rng(3)
    m1, m2 = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    s1, s2 = m1 @ m1.T + 0.5 * np.eye(6), m2 @ m2.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6) + 2
    a, b = exact_moments(rng, 500, mu1, s1), exact_moments(rng, 400, mu2, s2)
    assert frechet_distance(a, b) == pytest.approx(gaussian_fd(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_rejects_mismatched_feature_sets():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 4)), np.zeros((10, 5)))


# --------------------------------------------------------------------------- class accuracy

def test_real_held_out_digits_are_classified(classifier, real):
    images, labels = real
    assert images.shape == (360, 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert quality.class_accuracy(classifier, images, labels) >= 0.97


def test_shuffled_labels_give_chance_accuracy(classifier, real):
    images, labels = real
    shuffled = np.random.default_rng(0).permutation(labels)
    acc = quality.class_accuracy(classifier, images, shuffled)
    # A (near-)perfect classifier scored against a random permutation of 360 balanced labels (36 per
    # class) matches about sum_k n_k^2 / N = 36 labels: mean 0.10, binomial-like std sqrt(.1*.9/360) = 0.016.
    # +-0.06 is close to 4 std; the permutation is seeded, so the figure itself is fixed.
    assert abs(acc - 0.1) < 0.06


def test_features_are_deterministic_and_penultimate(classifier, real):
    images, _ = real
    f1, f2 = quality.features(classifier, images[:50]), quality.features(classifier, images[:50])
    assert f1.shape == (50, classifier.config["feat_dim"])
    np.testing.assert_array_equal(f1, f2)


# --------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_of_identical_images_is_inf():
    x = np.random.default_rng(0).random((4, 3, 32, 32)).astype(np.float32)
    assert psnr(x, x) == math.inf


def test_psnr_of_a_known_mse():
    a = np.zeros((2, 3, 32, 32), np.float32)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    rng = np.random.default_rng(1)
    x, y = rng.random((3, 8, 8)), rng.random((3, 8, 8))
    mse = float(np.mean((x - y) ** 2))
    assert psnr(x, y) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-9)
    assert psnr(x * 255, y * 255, data_range=255.0) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-9)


def test_ssim_identical_is_one_and_noise_is_low(real):
    images, _ = real
    assert ssim(images[:8], images[:8]) == pytest.approx(1.0, abs=1e-12)
    noise = np.random.default_rng(0).random(images[:8].shape).astype(np.float32)
    assert ssim(images[:8], noise) < 0.5
    assert ssim(noise, np.random.default_rng(1).random(noise.shape)) < 0.5


def test_ssim_falls_with_distortion(real):
    images, _ = real
    x = images[:8]
    noise = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    mild, strong = np.clip(x + 0.02 * noise, 0, 1), np.clip(x + 0.2 * noise, 0, 1)
    assert 1.0 > ssim(x, mild) > ssim(x, strong)


# --------------------------------------------------------------------------- figures

def test_sample_grid_writes_a_png_of_the_expected_size(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.random((10, 3, 32, 32)).astype(np.float32)
    pruned = rng.random((10, 3, 32, 32)).astype(np.float32)
    path = sample_grid(dense, pruned, tmp_path / "grid.png", scale=2, pad=2)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (10 * 64 + 11 * 2, 2 * 64 + 3 * 2)
        px = np.asarray(img.convert("RGB"))
    # top-left tile is the first dense image, the tile under it the first pruned one (nearest x2)
    expected = (np.clip(dense[0], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(px[2:66:2, 2:66:2], expected)
    expected = (np.clip(pruned[0], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(px[68:132:2, 2:66:2], expected)


def test_sweep_plot_writes_a_png(tmp_path):
    rows = [{"sparsity": s, "fd_ratio": 1 + s, "accuracy": 1 - s / 2, "dense_accuracy": 1.0} for s in (0.2, 0.43, 0.6)]
    path = sweep_plot(rows, tmp_path / "sweep.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 400)


# --------------------------------------------------------------------------- evaluate

def test_evaluate_is_deterministic_and_lossless_against_itself(classifier, real):
    from pipelines import tiny as tiny_pipeline

    pipe, other = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    real_feats = quality.features(classifier, real[0])
    kw = dict(n_per_class=1, seed=0, steps=2, classifier=classifier, real_features=real_feats)
    same = quality.evaluate(pipe, pipe, **kw)
    diff = quality.evaluate(pipe, other, **kw)
    assert same["n_samples"] == diff["n_samples"] == 10
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert same["fd_ratio"] == pytest.approx(1.0) and same["dense"] == same["pruned"]
    assert diff["dense"] == same["dense"]  # same seed, same pipeline: the same figures again
    assert diff["psnr_db"] < 60 and diff["ssim"] < 1.0 and diff["pruned"] != diff["dense"]
