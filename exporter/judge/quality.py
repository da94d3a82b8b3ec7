"""The quality yardstick: does the pruned pipeline still make the same pictures?

* Fréchet distance (FD) between the penultimate features of a small digit classifier (shipped beside the
  demo pipeline) on generated digits and on the shipped held-out real digits -- FID's recipe with a
  feature space that fits 32x32 digits instead of Inception (larger images are area-averaged to 32x32).
* Class accuracy of generated digits against the digit their prompt asks for (the demo's held-out phrasings,
  tinyprune/demo/captions.py: prompts the demo never saw in training).
* PSNR and SSIM of pruned against dense images generated from the same prompts, seeds and initial noise.
* A sample grid PNG (dense row on top, pruned row under it, the prompt under each column) and a
  sparsity-quality plot for sweeps.

Everything is deterministic: same inputs, same figures. Torch is needed for the classifier only; the
image metrics work on numpy arrays.
"""

from __future__ import annotations

import functools
import json
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from tinyprune.judge.drift import psnr
from tinyprune.errors import InputError

CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
EVAL_DATA = "digits_eval.npz"
DEFAULT_N_PER_CLASS = 20
NUM_DIGITS = 10
DEFAULT_BATCH = 100


# --------------------------------------------------------------------------- the classifier

@functools.lru_cache(maxsize=None)
def _classifier_class():
    import torch
    from torch import nn

    class DigitClassifier(nn.Module):
        """Small CNN for 32x32 RGB digits in [0, 1]; `features` is the penultimate (FD) layer."""

        def __init__(self, num_classes: int = 10, widths: tuple = (32, 64, 64), feat_dim: int = 64,
                     image_size: int = 32, dropout: float = 0.3):
            super().__init__()
            self.config = {"_class_name": "DigitClassifier", "num_classes": num_classes, "widths": list(widths),
                           "feat_dim": feat_dim, "image_size": image_size, "dropout": dropout}
            layers, cin = [], 3
            for i, w in enumerate(widths):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
                if i < len(widths) - 1:  # the last stage is a single conv
                    layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
                layers.append(nn.MaxPool2d(2))
                cin = w
            self.body = nn.Sequential(*layers)
            side = image_size // 2 ** len(widths)
            self.fc = nn.Linear(cin * side * side, feat_dim)
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(feat_dim, num_classes)

        def features(self, x: "torch.Tensor") -> "torch.Tensor":
            h = self.body(x * 2 - 1).flatten(1)
            return torch.relu(self.fc(h))

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.head(self.drop(self.features(x)))

    return DigitClassifier


def DigitClassifier(**config):  # noqa: N802 - a factory that reads like the class
    """Build the classifier (the class lives in a closure so that importing this module needs no torch)."""
    return _classifier_class()(**config)


def save_classifier(model, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(model.config, **(extra or {}))
    (path / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / CLASSIFIER_WEIGHTS))


def _demo_path(name: str) -> Path:
    return Path(str(resources.files("tinyprune.demo").joinpath(name)))


def load_classifier(path: str | Path | None = None):
    """The digit classifier from `path` (config.json + model.safetensors); default: the one shipped with the demo.

    Only safetensors are read (no pickle). Returned in eval mode with gradients off.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else _demo_path("classifier")
    cfg_file, weights = path / CLASSIFIER_CONFIG, path / CLASSIFIER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{path} is not a digit classifier: {CLASSIFIER_CONFIG} and {CLASSIFIER_WEIGHTS} are needed")
    config = json.loads(cfg_file.read_text())
    keys = ("num_classes", "widths", "feat_dim", "image_size", "dropout")
    model = DigitClassifier(**{k: config[k] for k in keys if k in config})
    model.load_state_dict(load_file(str(weights)))
    model.config.update(config)
    return model.eval().requires_grad_(False)


def real_digits(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shipped held-out real digits: images float32 [N, 3, 32, 32] in [0, 1] and int64 labels [N]."""
    path = Path(path) if path is not None else _demo_path(EVAL_DATA)
    if not path.is_file():
        raise InputError(f"{path} is missing: the held-out real digits ship with the demo pipeline")
    with np.load(path, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    images = np.repeat(images[:, None].astype(np.float32) / 255.0, 3, axis=1)
    return images, labels.astype(np.int64)


def _as_numpy(images, dtype=np.float32) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=dtype)


def _batches(images: np.ndarray, batch: int):
    for i in range(0, len(images), batch):
        yield images[i:i + batch]


def classifier_input(classifier, images) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] at the classifier's size: area-averaged by H / size (a whole multiple)."""
    images = _as_numpy(images)
    size = int(classifier.config.get("image_size", 32))
    h = images.shape[-1]
    if h == size:
        return images
    if h % size or images.shape[-2] != h:
        raise InputError(f"the digit classifier reads {size}x{size} images (or square whole multiples), "
                         f"not {images.shape[-2]}x{h}")
    f = h // size
    return images.reshape(*images.shape[:-2], size, f, size, f).mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def features(classifier, images, batch: int = 256) -> np.ndarray:
    """Penultimate classifier features, float64 [B, feat_dim], of images [B, 3, H, W] in [0, 1]."""
    import torch

    images = classifier_input(classifier, images)
    with torch.inference_mode():
        out = [classifier.features(torch.from_numpy(np.ascontiguousarray(b))).double().numpy()
               for b in _batches(images, batch)]
    return np.concatenate(out) if out else np.zeros((0, classifier.config["feat_dim"]))


def predict(classifier, images, batch: int = 256) -> np.ndarray:
    import torch

    images = classifier_input(classifier, images)
    with torch.inference_mode():
        out = [classifier(torch.from_numpy(np.ascontiguousarray(b))).argmax(1).numpy() for b in _batches(images, batch)]
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.int64)


def class_accuracy(classifier, images, labels) -> float:
    """Fraction of images the classifier assigns to their (conditioning) label."""
    labels = np.asarray(labels)
    return float(np.mean(predict(classifier, images) == labels))


# --------------------------------------------------------------------------- the metrics

def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, D] (FID's formula).

    scipy's sqrtm may return a complex matrix with tiny imaginary parts from round-off; only the real part
    is kept. A singular product gets pytorch-fid's remedy (a small ridge on both covariances). Round-off
    below zero is clipped: the distance is never negative.
    """
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FD needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    with warnings.catch_warnings():  # fewer samples than dims: singular by construction, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():
            ridge = np.eye(len(s_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def ssim(a, b, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) with the standard 11x11 Gaussian window (sigma 1.5).

    Inputs are [H, W], [C, H, W] or [B, C, H, W]; the window runs over H and W of each image and channel,
    the statistics use population (not sample) covariance, and the mean is taken over the valid region
    (5-pixel border cropped), as scikit-image does with gaussian_weights=True.
    """
    from scipy.ndimage import gaussian_filter

    a, b = _as_numpy(a, np.float64), _as_numpy(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    if a.ndim < 2:
        raise ValueError("SSIM needs images of at least [H, W]")
    truncate = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> an 11x11 window
    sig = (0.0,) * (a.ndim - 2) + (sigma, sigma)

    def blur(x):
        return gaussian_filter(x, sigma=sig, truncate=truncate, mode="reflect")

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    pad = int(truncate * sigma + 0.5)
    h, w = a.shape[-2:]
    if h > 2 * pad and w > 2 * pad:
        smap = smap[..., pad:h - pad, pad:w - pad]
    return float(smap.mean())


# --------------------------------------------------------------------------- figures

def _to_uint8_hwc(images) -> np.ndarray:
    x = _as_numpy(images)
    if x.ndim == 3:
        x = x[None]
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


CAPTION_HEIGHT = 24  # two lines of PIL's default bitmap font under each column


def sample_grid(dense_images, pruned_images, path: str | Path, scale: int = 2, pad: int = 2,
                captions: list[str] | None = None) -> Path:
    """PNG with the dense images in the top row and the pruned ones (same seeds and prompts) under them, and each
    column's caption (its prompt) under the two rows when given.

    Images are [N, 3, H, W] in [0, 1], upscaled `scale` times (nearest) with `pad` white pixels around each
    tile: the PNG is N*(W*scale) + (N+1)*pad wide and 2*(H*scale) + 3*pad high (+ CAPTION_HEIGHT with captions).
    """
    from PIL import Image, ImageDraw

    rows = [_to_uint8_hwc(dense_images), _to_uint8_hwc(pruned_images)]
    if rows[0].shape != rows[1].shape:
        raise ValueError(f"dense and pruned image sets differ in shape: {rows[0].shape} vs {rows[1].shape}")
    n, h, w, _ = rows[0].shape
    th, tw = h * scale, w * scale
    extra = CAPTION_HEIGHT if captions else 0
    canvas = np.full((2 * th + 3 * pad + extra, n * tw + (n + 1) * pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            tile = img.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + r * (th + pad), pad + i * (tw + pad)
            canvas[y:y + th, x:x + tw] = tile
    image = Image.fromarray(canvas)
    if captions:
        draw = ImageDraw.Draw(image)
        for i, text in enumerate(captions[:n]):
            x, y = pad + i * (tw + pad), 2 * th + 3 * pad
            for k, line in enumerate(_wrap(draw, text, tw)[:2]):
                draw.text((x, y + 11 * k), line, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _wrap(draw, text: str, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than that stands alone on its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def sweep_plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Sparsity (x) against FD ratio to dense (left y, lower is better) and class accuracy (right y).

    Each row: {"sparsity": s, "fd_ratio": r, "accuracy": a} with optional "method" (one line per method)
    and "dense_accuracy" (drawn as a dotted reference). evaluate()'s nested {"pruned": {"accuracy"}} works too.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def acc(row):
        return row["accuracy"] if "accuracy" in row else row["pruned"]["accuracy"]

    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(str(row.get("method", "")), []).append(row)
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax2 = ax1.twinx()
    for method, mrows in methods.items():
        mrows = sorted(mrows, key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in mrows]
        suffix = f" ({method})" if method else ""
        ax1.plot(xs, [r["fd_ratio"] for r in mrows], "o-", color="tab:red", label="FD ratio" + suffix)
        ax2.plot(xs, [acc(r) for r in mrows], "s--", color="tab:blue", label="accuracy" + suffix)
    dense_acc = [r["dense_accuracy"] for r in rows if "dense_accuracy" in r] or \
                [r["dense"]["accuracy"] for r in rows if "dense" in r]
    if dense_acc:
        ax2.axhline(dense_acc[0], color="tab:blue", linestyle=":", linewidth=1, label="dense accuracy")
    ax1.axhline(1.0, color="tab:red", linestyle=":", linewidth=1)
    ax1.set_xlabel("sparsity")
    ax1.set_ylabel("FD ratio to dense (lower is better)", color="tab:red")
    ax2.set_ylabel("class accuracy", color="tab:blue")
    ax2.set_ylim(0.0, 1.02)
    ax1.set_ylim(bottom=0.0)
    handles = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    ax1.set_title(title or "sparsity vs quality")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def pareto_plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Measured UNet speed-up (x) against FD ratio to dense (left panel, lower is better) and class accuracy (right
    panel, higher is better), one marker per method, dense at (1, 1) / its accuracy, and each panel's front (rows
    flagged "pareto_fd" / "pareto_accuracy") joined by a line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.2), dpi=100)
    markers = "osD^vP*X"

    def name(r):  # 2:4 apart from the same method's unstructured zeros
        return str(r["method"]) + ("" if r["pattern"] in ("unstructured", "channel") else f" {r['pattern']}")

    methods = list(dict.fromkeys(name(r) for r in rows))
    for ax, key, flag, label in ((axes[0], "fd_ratio", "pareto_fd", "FD ratio to dense (lower is better)"),
                                 (axes[1], "accuracy", "pareto_accuracy", "class accuracy (higher is better)")):
        for i, m in enumerate(methods):
            mine = [r for r in rows if name(r) == m]
            ax.scatter([r["speedup"] for r in mine], [r[key] for r in mine], marker=markers[i % len(markers)],
                       s=40, label=m, zorder=3)
        front = sorted((r for r in rows if r.get(flag)), key=lambda r: r["speedup"])
        if front:
            ax.plot([r["speedup"] for r in front], [r[key] for r in front], "-", color="0.4", linewidth=1,
                    label="front", zorder=2)
        dense = 1.0 if key == "fd_ratio" else next((r["dense_accuracy"] for r in rows), None)
        if dense is not None:
            ax.scatter([1.0], [dense], marker="*", s=120, color="black", label="dense", zorder=4)
        ax.axvline(1.0, color="0.7", linestyle=":", linewidth=1)
        ax.set_xlabel("UNet speed-up over dense, measured")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(bottom=0.0)
    axes[1].set_ylim(0.0, 1.02)
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(title or "speed-up vs quality", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- end to end

def conditions_for(pipe, labels: list[int]) -> list:
    """What the pipeline is conditioned on to draw each digit of `labels`: its family's yardstick conditions (the
    demo's held-out phrasings for text pipelines)."""
    conditions = pipe.family.yardstick_conditions(list(labels))
    if conditions is None:
        raise InputError(f"a {pipe.family.name} pipeline cannot be asked for a digit: the digit yardstick needs "
                         "a text-conditioned pipeline")
    return conditions


def generate(pipe, labels: list[int], seed: int = 0, steps: int = 20, batch: int = DEFAULT_BATCH,
             guidance: float | None = None) -> np.ndarray:
    """Images [N, 3, H, W] in [0, 1] of the digits `labels`, through tinyprune.model.sampling.sample, in batches.

    Batch k uses seed + k for its initial noise, so two pipelines given the same labels, seed and batch
    start from the same noise.
    """
    from tinyprune.model.sampling import DEFAULT_GUIDANCE, sample

    g = DEFAULT_GUIDANCE if guidance is None else guidance
    return in_batches(conditions_for(pipe, labels), seed, batch,
                      lambda part, s: sample(pipe, part, seed=s, steps=steps, guidance=g).numpy())


def in_batches(conditions: list, seed: int, batch: int, draw) -> np.ndarray:
    """draw(conditions of batch k, seed + k) over the batches, concatenated: the noise every sampler of the
    yardstick (PyTorch's, the bundle runtime's) starts from for the same conditions."""
    return np.concatenate([draw(conditions[i:i + batch], seed + k)
                           for k, i in enumerate(range(0, len(conditions), batch))])


def evaluate(pipe_dense, pipe_pruned, n_per_class: int = DEFAULT_N_PER_CLASS, seed: int = 0, steps: int = 20,
             batch: int = DEFAULT_BATCH, guidance: float | None = None, classifier=None,
             real_features: np.ndarray | None = None) -> dict:
    """Quality of the pruned pipeline against the dense one, both sampled on the same labels and noise.

    Labels are 0..9 repeated `n_per_class` times, each drawn from a held-out phrasing; FD is against the shipped held-out real digits in the
    shipped classifier's feature space (`classifier` and `real_features` override both). `pipe_pruned=None`
    measures the dense pipeline alone.
    Returns {"n_samples", "seed", "steps", "dense": {"fd", "accuracy"}, "pruned": {"fd", "accuracy"},
    "fd_ratio", "psnr_db", "ssim"} (the pruned keys only when a pruned pipeline is given).
    """
    if n_per_class < 1:
        raise InputError("n_per_class must be >= 1")
    classifier = classifier if classifier is not None else load_classifier()
    num_classes = int(classifier.config["num_classes"])
    labels = list(range(num_classes)) * n_per_class
    real_feats = real_features if real_features is not None else features(classifier, real_digits()[0])

    def measure(images):
        return {"fd": frechet_distance(features(classifier, images), real_feats),
                "accuracy": class_accuracy(classifier, images, labels)}

    result: dict = {"n_samples": len(labels), "seed": seed, "steps": steps}
    dense = generate(pipe_dense, labels, seed=seed, steps=steps, batch=batch, guidance=guidance)
    result["dense"] = measure(dense)
    if pipe_pruned is not None:
        pruned = generate(pipe_pruned, labels, seed=seed, steps=steps, batch=batch, guidance=guidance)
        result["pruned"] = measure(pruned)
        d_fd = result["dense"]["fd"]
        result["fd_ratio"] = result["pruned"]["fd"] / d_fd if d_fd > 0 else float("inf")
        result["psnr_db"] = psnr(dense, pruned)
        result["ssim"] = ssim(dense, pruned)
    return result
