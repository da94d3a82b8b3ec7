"""Physical removal: the kept units of each group become a narrower module (or a replacement when none is kept)."""

from __future__ import annotations

import torch
from torch import nn

from tinyprune.model.structure import (SHRINK, Group, ValueOnlyAttention, _attention_ok, _attention_whole_ok,
                                       find_groups, get_module, set_module, structure_of)


def remove_units(unet: nn.Module, keep: dict[str, torch.Tensor], groups: list[Group] | None = None,
                 after_each=lambda: None) -> dict:
    """Physically keep only the listed units of each group (sorted unit indices; absent = keep all);
    `after_each()` runs after each group is replaced (the prune stage hands its dense weights' pages back there).

    Returns the structure record (what reload needs to rebuild the shapes) and stores it, merged with
    any earlier record, on the model as `unet.tinyprune_structure`.
    """
    groups = {g.path: g for g in (groups if groups is not None else find_groups(unet))}
    for path, units in keep.items():
        g = groups[path]
        units = torch.as_tensor(units, dtype=torch.long).sort().values
        if len(units) == g.units:
            continue
        if len(units) == 0 and not g.removable:
            raise ValueError(f"{path}: the last unit of this {g.kind} group cannot be removed")
        new = SHRINK[g.kind](get_module(unet, path), g, units)
        set_module(unet, path, new)
        after_each()
    record = structure_of(unet)
    unet.tinyprune_structure = record
    return record


def collapse_single_token_attention(unet: nn.Module) -> list[str]:
    """Replace every cross-attention (context dim != query dim or marked cross) that the caller knows sees
    a single context token by ValueOnlyAttention. Returns the paths replaced."""
    from diffusers.models.attention_processor import Attention

    done = []
    for path, m in list(unet.named_modules()):
        if (isinstance(m, Attention) and getattr(m, "is_cross_attention", False) and _attention_ok(m)
                and _attention_whole_ok(m) and getattr(m, "norm_cross", None) is None
                and getattr(m, "norm_q", None) is None):
            set_module(unet, path, ValueOnlyAttention(m.to_v, m.to_out, m.heads))
            done.append(path)
    if done:
        unet.tinyprune_structure = structure_of(unet)
    return done
