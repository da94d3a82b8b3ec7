"""What goes with each unit of a prunable group: the parameters the structured scores sum over."""

from __future__ import annotations

import torch
from torch import nn

from tinyprune.model.structure import Group, ValueOnlyAttention, _ff_parts, get_module


def prunable_params(model: nn.Module) -> int:
    """Conv2d + Linear weight elements: the same count masks.prunable_weights sums."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def unit_params(unet: nn.Module, g: Group) -> list[tuple[torch.Tensor, int, bool]]:
    """The parameters that go with a group's units: (tensor, channel axis, two halves?) -- a tensor with
    two halves (GEGLU proj, scale_shift time_emb_proj) holds channel c at rows c and c + C."""
    m = get_module(unet, g.path)
    out = []

    def add(layer, axis, halves=False):
        out.append((layer.weight, axis, halves))
        if axis == 0 and getattr(layer, "bias", None) is not None:
            out.append((layer.bias, 0, halves))

    if g.kind == "resnet":
        add(m.conv1, 0)
        if m.norm2.affine:
            add(m.norm2, 0)
        if m.time_emb_proj is not None:
            add(m.time_emb_proj, 0, m.time_embedding_norm == "scale_shift")
        add(m.conv2, 1)
    elif g.kind == "attention":
        for layer in ((m.to_v,) if isinstance(m, ValueOnlyAttention) else (m.to_q, m.to_k, m.to_v)):
            add(layer, 0)
        add(m.to_out[0], 1)
    else:
        proj, gated, out_layer = _ff_parts(m)
        add(proj, 0, gated)
        add(out_layer, 1)
    return out


SUM_SLICE = 1 << 22  # elements cast to float64 at a time by _sum_along


def _sum_along(v: torch.Tensor, axis: int) -> torch.Tensor:
    """v summed over every axis but `axis`, in float64, a slice of rows at a time: torch's sum(dtype=float64) casts
    the whole tensor first (at SD size 0.11 GiB for one 1280-channel kernel, beside the scoring's gradients)."""
    rows = max(1, SUM_SLICE // max(1, v[0].numel()))
    dims = [d for d in range(v.dim()) if d != axis]
    parts = [c.double().sum(dims) if dims else c.double() for c in v.split(rows)]
    return torch.cat(parts) if axis == 0 else torch.stack(parts).sum(0)


def unit_sums(unet: nn.Module, g: Group, per_element) -> torch.Tensor:
    """Sum of per_element(param) over every element that goes with each unit: a tensor [units]."""
    total = torch.zeros(g.units, dtype=torch.float64)
    for p, axis, halves in unit_params(unet, g):
        v = per_element(p)
        if v is None:
            continue
        v = _sum_along(v.detach(), axis)
        if halves:
            v = v[: len(v) // 2] + v[len(v) // 2:]
        total += v.view(g.units, g.width).sum(1)
    return total
