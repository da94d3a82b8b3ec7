"""Scores -> masks. Masks are plain data: {parameter name: bool tensor, True = keep}.

The prunable weights of a model are the weights of its Conv2d and Linear layers; the requested
sparsity is the fraction of those that become zero. The same set is what ONNX inspection calls
prunable (Conv / MatMul / Gemm weight initializers), so figures agree on both sides.
"""

from __future__ import annotations

import torch

from tinyprune.errors import InputError


def prunable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


def _keep_top(score: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Mask with exactly n_zero False entries at the lowest scores (ties broken by position)."""
    flat = score.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_zero > 0:
        mask[torch.argsort(flat, stable=True)[:n_zero]] = False
    return mask.view_as(score)


def unstructured(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Exactly round(sparsity * n) zeros: over all weights together (global) or in each layer."""
    return dict(iter_unstructured(scores, sparsity, scope))


_SAMPLE = 1 << 22  # scores read for kth_smallest's bracket
_CHUNK = 1 << 20  # scores compared at a time


def _shape(scores, name: str) -> torch.Size:
    return scores.shape(name) if hasattr(scores, "shape") else scores[name].shape


def _chunks(scores, name: str):
    """One layer's flattened scores, _CHUNK at a time, as float, each valid until the next is drawn: where the
    mapping can (importance.magnitude's), computed chunk by chunk into one reused buffer. Temporaries the size
    of each layer (its |w|, its comparisons) made the prune stage of SD-1.5's UNet peak 0.6-1.0 GiB over the
    weights, against 0.2-0.5 GiB so (benchmarks/results/sd15_scale.md)."""
    if hasattr(scores, "chunks"):
        return scores.chunks(name, _CHUNK)
    return scores[name].detach().reshape(-1).float().split(_CHUNK)


def kth_smallest(scores, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest value (1-based) over all score tensors, and how many values are strictly below it.

    Exact, like torch.cat(...).kthvalue(k), without a concatenated copy of all the scores (3.4 GB at Stable
    Diffusion size): a strided sample of about _SAMPLE scores brackets the k-th value, one pass counts the scores
    below the bracket and keeps those inside it (a few per mille), and the k-th is found among those. A bracket
    that misses (the sample is not random) is widened until it holds it. `scores` is a mapping whose values may be
    computed on access (importance.magnitude's are). Two reads of every score; the bit-pattern histograms this
    replaces took 19 s on SD-1.5's UNet, this about 4."""
    numels = [_shape(scores, name).numel() for name in scores]
    total = sum(numels)
    step = max(1, total // _SAMPLE)
    sample, at = torch.empty(sum(-(-n // step) for n in numels)), 0
    for name in scores:  # every step-th score of each layer, counted from the layer's start
        for i, c in enumerate(_chunks(scores, name)):
            part = c[(-i * _CHUNK) % step::step]
            sample[at:at + len(part)] = part
            at += len(part)
    sample = sample.sort().values
    n = len(sample)
    margin = 8 * (k / total * (1 - k / total) / n) ** 0.5 + 2 / n  # 8 sigma of the sample quantile
    flags, both = torch.empty(_CHUNK, dtype=torch.bool), torch.empty(_CHUNK, dtype=torch.bool)
    while True:
        at_lo, at_hi = (int(min(max((k / total + d) * n, 0), n - 1)) for d in (-margin, margin))
        lo = sample[at_lo] if at_lo > 0 else -torch.inf
        hi = sample[at_hi] if at_hi < n - 1 else torch.inf
        below, inside = 0, []
        for name in scores:
            for c in _chunks(scores, name):
                f, g = flags[:len(c)], both[:len(c)]
                below += int(torch.lt(c, lo, out=f).sum())
                torch.ge(c, lo, out=f).logical_and_(torch.le(c, hi, out=g))
                inside.append(c[f])
        inside = torch.cat(inside)
        if below < k <= below + len(inside):
            value = inside.kthvalue(k - below).values
            return value, below + int((inside < value).sum())
        margin *= 4


class MaskStream:
    """Unstructured masks made one layer at a time by .items() (bake.apply_masks reads them that way).

    len() is the number of layers. Read once, before any weight is baked: with lazily computed scores
    (importance.magnitude), each layer's mask is made from its weights just before they are zeroed.
    """

    def __init__(self, scores, sparsity: float, scope: str = "global"):
        self.scores, self.sparsity, self.scope = scores, sparsity, scope

    def items(self):
        return iter_unstructured(self.scores, self.sparsity, self.scope)

    def __len__(self) -> int:
        return len(self.scores)


def iter_unstructured(scores, sparsity: float, scope: str = "global"):
    """(name, mask) one layer at a time, so that a caller can bake each mask before the next exists.

    Masks of all layers together are a quarter of the fp32 weights; at Stable Diffusion size that is
    0.86 GB the prune stage need not hold.
    """
    if scope == "layer":
        for name, s in scores.items():
            yield name, _keep_top(s, round(sparsity * s.numel()))
        return
    total = sum(_shape(scores, name).numel() for name in scores)
    n_zero = round(sparsity * total)
    if n_zero == 0:
        for name in scores:
            yield name, torch.ones(_shape(scores, name), dtype=torch.bool)
        return
    # An exact threshold, then ties at the threshold resolved in order.
    threshold, below = kth_smallest(scores, n_zero)
    ties_to_zero = n_zero - below  # >= 1: the threshold itself is the n_zero-th smallest
    equal = torch.empty(_CHUNK, dtype=torch.bool)
    for name in scores:
        shape = _shape(scores, name)
        mask, at = torch.empty(shape.numel(), dtype=torch.bool), 0
        for c in _chunks(scores, name):
            part = mask[at:at + len(c)]
            torch.gt(c, threshold, out=part)
            ties = torch.eq(c, threshold, out=equal[:len(c)]).nonzero().flatten()
            part[ties[ties_to_zero:]] = True
            ties_to_zero = max(0, ties_to_zero - len(ties))
            at += len(c)
        yield name, mask.view(shape)


# TensorRT reads 2:4 along input channels (Conv [K, C, R, S]) / in-features (Linear [out, in]):
# axis 1 of the torch layout for both.
NM_AXIS = 1


def nm_eligible(weight: torch.Tensor, m: int = 4) -> str | None:
    """None when the layer can hold N:M along TensorRT's axis, else why not."""
    if weight.shape[NM_AXIS] % m:
        return f"{weight.shape[NM_AXIS]} input channels is not a multiple of {m}"
    return None


def n_of_m(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n highest of every m consecutive weights along the input-channel axis."""
    reason = nm_eligible(score, m)
    if reason:
        raise InputError(f"cannot apply {n}:{m}: {reason}")
    moved = score.movedim(NM_AXIS, -1)  # [K, R, S, C] or [out, in]
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.view(moved.shape).movedim(-1, NM_AXIS)


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0
