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


def kth_smallest(scores, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest value (1-based) over all score tensors, and how many values are strictly below it.

    Exact, like torch.cat(...).kthvalue(k), without a concatenated copy of all the scores (3.4 GB at Stable
    Diffusion size): a strided sample of about _SAMPLE scores brackets the k-th value, one pass counts the scores
    below the bracket and keeps those inside it (a few per mille), and the k-th is found among those. A bracket
    that misses (the sample is not random) is widened until it holds it. `scores` is a mapping whose values may be
    computed on access (importance.magnitude's are). Two reads of every score; the bit-pattern histograms this
    replaces took 19 s on SD-1.5's UNet, this about 4."""
    total = sum(s.numel() for s in scores.values())
    step = max(1, total // _SAMPLE)
    # clone: a strided view would keep each layer's whole (lazily computed) score tensor alive
    sample = torch.cat([s.detach().flatten()[::step].float().clone() for s in scores.values()]).sort().values
    n = len(sample)
    margin = 8 * (k / total * (1 - k / total) / n) ** 0.5 + 2 / n  # 8 sigma of the sample quantile
    while True:
        at_lo, at_hi = (int(min(max((k / total + d) * n, 0), n - 1)) for d in (-margin, margin))
        lo = sample[at_lo] if at_lo > 0 else -torch.inf
        hi = sample[at_hi] if at_hi < n - 1 else torch.inf
        below, inside = 0, []
        for s in scores.values():
            for c in s.detach().flatten().float().split(_CHUNK):  # bounded temporaries: freed heap gets reused
                below += int((c < lo).sum())
                inside.append(c[(c >= lo) & (c <= hi)])
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
    total = sum(s.numel() for s in scores.values())
    n_zero = round(sparsity * total)
    if n_zero == 0:
        for name, s in scores.items():
            yield name, torch.ones_like(s, dtype=torch.bool)
        return
    # An exact threshold, then ties at the threshold resolved in order.
    threshold, below = kth_smallest(scores, n_zero)
    ties_to_zero = n_zero - below  # >= 1: the threshold itself is the n_zero-th smallest
    for name, s in scores.items():
        s = s.float()
        mask = (s > threshold).flatten()
        ties = (s == threshold).flatten().nonzero().flatten()
        mask[ties[ties_to_zero:]] = True
        ties_to_zero = max(0, ties_to_zero - len(ties))
        yield name, mask.view_as(s)


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
