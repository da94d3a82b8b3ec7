"""The prune stage: score -> mask -> bake, per component, driven by a PruneSpec."""

from __future__ import annotations

import torch

from .bake import apply_masks, plan_sparsity
from .config import PruneSpec
from .importance import SCORES
from .masks import n_of_m, nm_eligible, prunable_weights, unstructured
from .pipeline import Pipeline

# TensorRT rarely picks a sparse kernel for thin layers (its docs: sparsity pays for large GEMM-heavy
# layers); below this many input channels we leave a layer dense and say why.
MIN_2TO4_CHANNELS = 64


def _two_four(weights: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], sparsity: float):
    """2:4 on the eligible layers that lose the least weight energy, until `sparsity` is reached.

    Each chosen layer contributes exactly half its weights; the achieved sparsity is the largest
    reachable value not above the request. Returns masks and the per-layer decision table.
    """
    total = sum(w.numel() for w in weights.values())
    candidates, decisions = [], {}
    for name, w in weights.items():
        reason = nm_eligible(w)
        if reason is None and w.shape[1] < MIN_2TO4_CHANNELS:
            reason = f"{w.shape[1]} input channels < {MIN_2TO4_CHANNELS}: TensorRT would not pick a sparse kernel"
        if reason:
            decisions[name] = {"pattern": "none", "reason": reason}
            continue
        mask = n_of_m(scores[name])
        lost = float((w.detach() * ~mask).pow(2).sum() / w.detach().pow(2).sum().clamp_min(1e-30))
        candidates.append((lost, name, mask))
    masks, budget = {}, round(sparsity * total)
    for lost, name, mask in sorted(candidates, key=lambda c: (c[0], c[1])):
        if weights[name].numel() // 2 <= budget:
            masks[name] = mask
            budget -= weights[name].numel() // 2
            decisions[name] = {"pattern": "2:4", "energy_lost": round(lost, 6)}
        else:
            decisions[name] = {"pattern": "none", "reason": "target sparsity reached", "energy_lost": round(lost, 6)}
    return masks, decisions


def prune(pipe: Pipeline, spec: PruneSpec, batches=None, log=lambda msg: None) -> dict:
    """Prune the UNet (and the VAE when asked) in place; returns the plan recorded in the bundle."""
    models = {"unet": pipe.unet}
    if spec.prune_vae:
        models["vae"] = pipe.vae
    plan = {"method": spec.method, "pattern": spec.pattern, "scope": spec.scope, "requested": spec.sparsity,
            "components": {}}
    for comp, model in models.items():
        weights = prunable_weights(model)
        scores = SCORES[spec.method](weights, batches)
        if spec.pattern == "2:4":
            masks, decisions = _two_four(weights, scores, spec.sparsity)
        else:
            masks, decisions = unstructured(scores, spec.sparsity, spec.scope), {}
        layers = apply_masks(model, masks)
        for name, w in weights.items():
            layers.setdefault(name, {"zeros": int((w == 0).sum()), "numel": w.numel()})
            layers[name].update(decisions.get(name, {}))
        achieved = plan_sparsity(layers)
        log(f"{comp}: {len(masks)} of {len(weights)} layers pruned, sparsity {achieved:.4f}")
        plan["components"][comp] = {"sparsity": achieved, "layers": layers}
    return plan
