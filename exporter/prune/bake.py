"""Baking: masks become zeros in the weights, in place, and a plan records what was done."""

from __future__ import annotations

import torch

from tinyprune.prune.masks import prunable_weights


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Zero the masked weights in place; returns the per-layer plan (zeros and size per tensor)."""
    weights = prunable_weights(model)
    plan = {}
    for name, mask in masks.items():
        w = weights[name]
        w.mul_(mask.to(w.dtype))
        plan[name] = {"zeros": int((w == 0).sum()), "numel": w.numel()}
    return plan


def plan_sparsity(plan: dict) -> float:
    total = sum(p["numel"] for p in plan.values())
    return sum(p["zeros"] for p in plan.values()) / total if total else 0.0
