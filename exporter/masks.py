"""Scores -> masks. Masks are plain data: {parameter name: bool tensor, True = keep}.

The prunable weights of a model are the weights of its Conv2d and Linear layers; the requested
sparsity is the fraction of those that become zero. The same set is what ONNX inspection calls
prunable (Conv / MatMul / Gemm weight initializers), so figures agree on both sides.
"""

from __future__ import annotations

import torch

from .errors import InputError


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
    if scope == "layer":
        return {name: _keep_top(s, round(sparsity * s.numel())) for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    n_zero = round(sparsity * total)
    if n_zero == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    # A threshold from kthvalue, then ties at the threshold resolved in order, keeps one copy of the
    # scores in memory instead of a global argsort's several.
    threshold = torch.cat([s.flatten().float() for s in scores.values()]).kthvalue(n_zero).values
    below = sum(int((s < threshold).sum()) for s in scores.values())
    ties_to_zero = n_zero - below  # >= 1: the threshold itself is the n_zero-th smallest
    masks = {}
    for name, s in scores.items():
        mask = (s > threshold).flatten()
        ties = (s == threshold).flatten().nonzero().flatten()
        mask[ties[ties_to_zero:]] = True
        ties_to_zero = max(0, ties_to_zero - len(ties))
        masks[name] = mask.view_as(s)
    return masks


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
