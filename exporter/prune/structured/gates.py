"""Gates: units masked (or scaled) by forward pre-hooks instead of removed, for scoring and learnt masks."""

from __future__ import annotations

import torch
from torch import nn

from tinyprune.model.structure import Group, get_module



class Gates:
    """Multiply each group's units by a gate, in place of removing them: forward pre-hooks on the layer
    that reads the units (resnet conv2, attention to_out[0], feed-forward net[2]).

    values: {path: tensor [units] or [batch, units]}; 0 masks a unit, 1 keeps it, anything between scales
    it (hard-concrete gates are differentiable). `set(path, value)` changes a gate without re-hooking.
    A context manager: hooks come off on exit.
    """

    def __init__(self, unet: nn.Module, groups: list[Group], values: dict | None = None):
        self.unet, self.groups = unet, {g.path: g for g in groups}
        self.values = dict(values or {})
        self.handles = []

    def set(self, path: str, value) -> None:
        self.values[path] = value

    def _hook(self, g: Group, layout: str):
        def pre(module, args):
            v = self.values.get(g.path)
            if v is None:
                return None
            x = args[0]
            gate = v.to(device=x.device, dtype=x.dtype).repeat_interleave(g.width, dim=-1)
            if layout == "nchw":  # [C] or [B, C] -> [.., C, 1, 1]
                gate = gate.view(*gate.shape, 1, 1) if gate.dim() == 1 else gate.view(gate.shape[0], -1, 1, 1)
            elif gate.dim() == 2:  # tokens: [B, C] -> [B, 1, C]
                gate = gate[:, None, :]
            return (x * gate,) + tuple(args[1:])

        return pre

    def __enter__(self):
        for path, g in self.groups.items():
            m = get_module(self.unet, path)
            if g.kind == "resnet":
                self.handles.append(m.conv2.register_forward_pre_hook(self._hook(g, "nchw")))
            elif g.kind == "attention":
                self.handles.append(m.to_out[0].register_forward_pre_hook(self._hook(g, "tokens")))
            else:
                self.handles.append(m.net[2].register_forward_pre_hook(self._hook(g, "tokens")))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def masks_from_keep(groups: list[Group], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 gate values from kept unit indices (groups absent from `keep` keep everything)."""
    out = {}
    for g in groups:
        if g.path in keep:
            v = torch.zeros(g.units)
            v[torch.as_tensor(keep[g.path], dtype=torch.long)] = 1.0
            out[g.path] = v
    return out
