"""The pruning plan: what the prune stage did to each component, written to pruned/pruning_plan.json.

One record class per kind of pruning, chosen by the plan's pattern (never by which keys a record has):
  MaskedComponent      unstructured and 2:4 (pattern "unstructured" | "2:4"): zeros set in place, one LayerPlan
                       per prunable tensor
  StructuredComponent  pattern "channel": channels, heads and operators removed; parameters and MACs before and after

to_dict() is the on-disk form (optional parts left out when absent, as the JSON has always been written);
PrunePlan.from_dict reads it back (validate, report).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

STRUCTURED_PATTERN = "channel"


def _present(obj) -> dict:
    """The dataclass's fields, shallow, without the optional ones that are absent (None)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class LayerPlan:
    """One prunable tensor of a masked component: its zeros, and the 2:4 selection's decision where one ran."""

    zeros: int
    numel: int
    pattern: str | None = None  # 2:4 selection: "2:4" (chosen) or "none" (left dense)
    reason: str | None = None  # why it was left dense
    sensitivity: float | None = None  # loss increase when made 2:4 alone (calibration data)
    energy_lost: float | None = None  # weight energy 2:4 removes (the data-free ranking)
    rank: int | None = None  # place in the 2:4 ranking, least sensitive first; None: not eligible

    @property
    def ranked(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict:
        return _present(self)


@dataclass(frozen=True, kw_only=True)
class ComponentPlan:
    sparsity: float  # masked: fraction of prunable weights that are zero; structured: fraction removed
    recovery: dict | None = None  # the recovery / distillation record (prune/recovery.py), when it ran

    def dense_params(self) -> int | None:
        """Prunable parameters before pruning, where pruning removed them (structured); None where zeros were
        set in place (the ONNX metadata counts those itself)."""
        return None

    def to_dict(self) -> dict:
        return _present(self)


@dataclass(frozen=True, kw_only=True)
class MaskedComponent(ComponentPlan):
    layers: Mapping[str, LayerPlan]
    l1_grad: dict | None = None  # the l1-grad record (importance/l1_grad.py), when l1-grad made the masks
    scores: str | None = None  # what ranked the weights when the method's own score did not apply

    def to_dict(self) -> dict:
        return dict(_present(self), layers={n: layer.to_dict() for n, layer in self.layers.items()})

    @staticmethod
    def from_dict(d: dict) -> "MaskedComponent":
        return MaskedComponent(**dict(d, layers={n: LayerPlan(**layer) for n, layer in d["layers"].items()}))


@dataclass(frozen=True, kw_only=True)
class StructuredComponent(ComponentPlan):
    params_dense: int
    params: int
    params_removed: float
    macs_dense: int
    macs: int
    target: dict  # {"kind": "params" | "macs" | "latency", "amount", with a speed-up target "speedup": its figures}
    allocation: dict  # {"scope", "normalize", "cost"}
    collapsed_single_token_attention: list
    groups: dict  # group path -> {"kind", "units", "kept", "removed"}
    structure: dict  # the new shapes (also unet/structure.json, read by model.pipeline.load_pipeline)
    scores: dict  # {"method", ...the importance function's record}
    removed_whole: list
    seconds: float

    def dense_params(self) -> int | None:
        return self.params_dense

    @staticmethod
    def from_dict(d: dict) -> "StructuredComponent":
        return StructuredComponent(**d)


@dataclass(frozen=True)
class PrunePlan:
    method: str
    pattern: str  # "unstructured" | "2:4" | "channel"
    scope: str
    requested: float
    components: Mapping[str, ComponentPlan]  # the pruned components ("unet", "vae") in pruning order

    @property
    def structured(self) -> bool:
        return self.pattern == STRUCTURED_PATTERN

    def sparsity(self) -> dict[str, float]:
        """Per pruned component, as results and reports give it (6 decimals)."""
        return {c: round(p.sparsity, 6) for c, p in self.components.items()}

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "scope": self.scope, "requested": self.requested,
                "components": {c: p.to_dict() for c, p in self.components.items()}}

    @staticmethod
    def from_dict(d: dict) -> "PrunePlan":
        kind = StructuredComponent if d["pattern"] == STRUCTURED_PATTERN else MaskedComponent
        return PrunePlan(d["method"], d["pattern"], d["scope"], d["requested"],
                         {c: kind.from_dict(p) for c, p in d["components"].items()})

