"""Scores -> masks. Masks are plain data: {parameter name: bool tensor, True = keep}.

The prunable weights of a model are the weights of its Conv2d and Linear layers; the requested
sparsity is the fraction of those that become zero. The same set is what ONNX inspection calls
prunable (Conv / MatMul / Gemm weight initializers), so figures agree on both sides.
"""

from __future__ import annotations

import numpy as np
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


_CHUNK = 1 << 22  # elements per pass step: bounds the temporaries of kth_smallest to ~100 MB


def _order_keys(chunk: torch.Tensor) -> np.ndarray:
    """uint32 keys whose integer order is the float32 order of `chunk` (-0.0 and 0.0 share one key)."""
    bits = (chunk.float() + 0.0).numpy().view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def kth_smallest(scores, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest value (1-based) over all score tensors, and how many values are strictly below it.

    Exact, like torch.cat(...).kthvalue(k), but in two histogram passes over the float32 bit patterns
    (high 16 bits, then low 16 bits inside the chosen bucket) so that no concatenated copy of all the
    scores exists: at Stable Diffusion size that copy alone is 3.4 GB. `scores` is a mapping whose
    values may be computed on access (importance.magnitude's are).
    """
    def chunks():
        for s in scores.values():
            yield from s.detach().flatten().split(_CHUNK)

    hi_counts = np.zeros(1 << 16, dtype=np.int64)
    for c in chunks():
        hi_counts += np.bincount(_order_keys(c) >> 16, minlength=1 << 16)
    hi_cum = hi_counts.cumsum()
    hi = int(np.searchsorted(hi_cum, k))
    below = int(hi_cum[hi - 1]) if hi else 0
    lo_counts = np.zeros(1 << 16, dtype=np.int64)
    for c in chunks():
        keys = _order_keys(c)
        lo_counts += np.bincount(keys[(keys >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo_cum = lo_counts.cumsum()
    lo = int(np.searchsorted(lo_cum, k - below))
    below += int(lo_cum[lo - 1]) if lo else 0
    key = np.uint32((hi << 16) | lo)
    bits = key & np.uint32(0x7FFFFFFF) if key >> 31 else ~key
    return torch.from_numpy(np.array([bits], dtype=np.uint32).view(np.float32))[0], below


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
