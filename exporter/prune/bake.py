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
        w.mul_(mask)  # no float copy of the mask: at Stable Diffusion size each is up to 59 MB
        plan[name] = {"zeros": w.numel() - int(torch.count_nonzero(w)), "numel": w.numel()}
    return plan


def plan_sparsity(plan: dict) -> float:
    total = sum(p["numel"] for p in plan.values())
    return sum(p["zeros"] for p in plan.values()) / total if total else 0.0
