"""The prune stage: score -> mask -> bake, per component, driven by a PruneSpec.

An Engine (prune/distributed.py) says where the data-driven work runs: the UNet goes to its device for calibration,
scoring and recovery and comes back to the CPU to be baked and saved; the VAE and text encoders, pruned by
magnitude only, stay on the CPU. On several ranks every rank runs this same function.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

from tinyprune.prune.bake import apply_masks, plan_sparsity
from tinyprune.prune.distributed import LOCAL, Engine
from tinyprune.config import PruneSpec
from tinyprune.prune import two_four
from tinyprune.prune.importance import SCORES
from tinyprune.prune.importance.l1_grad import gradient_magnitudes, l1_grad_scores, prune_l1_grad
from tinyprune.prune.masks import MaskStream, prunable_weights, unstructured
from tinyprune.model.pipeline import Pipeline
from tinyprune.prune.plan import LayerPlan, MaskedComponent, PrunePlan
from tinyprune.prune.recovery import mean_loss, recover
from tinyprune.runtime.measure import page_out_beside_unet


def _masks(model, weights, spec: PruneSpec, batches, scheduler, log, engine: Engine):
    """Masks, per-layer decisions and a record for one component. `batches` is None where no denoising
    loss applies (the VAE): l1-grad then falls back to magnitude and 2:4 to the data-free ranking."""
    o = spec.l1grad
    # distill (--recovery-target distill): the dense UNet, kept before any weight is zeroed, is the recovery's teacher
    teacher = copy.deepcopy(model) if (batches and spec.recovery_steps and o.distill) else None
    if spec.method == "l1-grad" and batches and spec.pattern == "unstructured":
        masks, info = prune_l1_grad(model, batches, spec.sparsity, scheduler=scheduler, alpha=o.alpha, beta=o.beta,
                                    l1=o.l1, recovery_steps=spec.recovery_steps, iterations=o.iterations, lr=o.lr,
                                    scope=spec.scope, seed=spec.seed, teacher=teacher, log=log, engine=engine)
        return masks, {}, {"l1_grad": info}
    info = {}
    if spec.method == "l1-grad" and batches:
        scores = l1_grad_scores(weights, gradient_magnitudes(model, batches, engine=engine), o.alpha, o.beta)
    elif spec.method == "l1-grad":
        scores = SCORES["magnitude"](weights, batches)
        info["scores"] = "magnitude (no denoising loss for this component)"
    else:
        scores = SCORES[spec.method](weights, batches)
    if spec.pattern == "2:4":  # the eligible layers least sensitive to 2:4 (measured loss increase)
        masks, decisions = two_four.select(model, weights, scores, spec.sparsity, batches, engine=engine, log=log)
        if batches and spec.recovery_steps:  # recovery changes the weights the lazy masks are made from
            masks = {name: masks[name] for name in masks}
    else:
        # recovery needs every mask at once; otherwise they are made and baked one layer at a time
        # (all masks together are a quarter of the fp32 weights: 0.86 GB at Stable Diffusion size)
        streamed = not (batches and spec.recovery_steps)
        masks = (MaskStream if streamed else unstructured)(scores, spec.sparsity, spec.scope)
        decisions = {}
    if batches and spec.recovery_steps:
        apply_masks(model, masks)
        loss_before = mean_loss(model, batches, engine=engine)
        masks, rec = recover(model, masks, batches, spec.recovery_steps, scheduler=scheduler, lr=o.lr, l1=o.l1,
                             seed=spec.seed, teacher=teacher, engine=engine)
        info["recovery"] = dict(rec, loss_before=round(loss_before, 6),
                                loss_after=round(mean_loss(model, batches, engine=engine), 6))
        log(f"recovery: {spec.recovery_steps} steps, calibration loss {loss_before:.5f} -> "
            f"{info['recovery']['loss_after']:.5f}")
    return masks, decisions, info


def prune(pipe: Pipeline, spec: PruneSpec, batches=None, log=lambda msg: None, engine: Engine = LOCAL,
          scores: dict | None = None) -> PrunePlan:
    """Prune the UNet (and the VAE and text encoders when asked) in place; returns the plan recorded in the bundle.
    On several ranks it returns only once every rank holds the same pruned models. `scores`: a structured method's
    unit scores to fill or reuse (prune_structured's), for several prunings of the same model on the same batches."""
    from tinyprune.errors import InputError

    family = pipe.family
    models = {"unet": pipe.unet}
    if spec.prune_vae:
        if pipe.vae is None:
            raise InputError(f"--prune-vae: a {family.name} pipeline has no VAE (it denoises in pixel space)")
        models["vae"] = pipe.vae
    if spec.prune_text_encoder:
        if not family.PRUNABLE_PARTS:
            raise InputError(f"--prune-text-encoder: a {family.name} pipeline has no text encoder")
        models.update({name: pipe.parts[name] for name in family.PRUNABLE_PARTS})
    if batches is None and spec.needs_calibration:
        from tinyprune.model.calibration import calibration_batches

        # the VAE's and text encoders' pages, resident from the dense references (the calibration reads the
        # text encoder's again, once)
        page_out_beside_unet()

        with engine.hosting(pipe.unet), engine.autocast():  # the dense model's samples, on the engine's device
            batches = calibration_batches(pipe, spec.calibration, seed=spec.seed, samples=spec.calibration_samples,
                                          default=spec.default_calibration_samples)
        size = batches[0].x_t.shape[-1]
        log(f"calibration: {sum(len(b.t) for b in batches)} latents in {len(batches)} batches "
            f"({'images from ' + spec.calibration if spec.calibration else 'data-free: the dense model samples'})"
            + ("" if size == pipe.latent_size else f" at latent {size}, not the native {pipe.latent_size}: a UNet "
               "this large calibrates smaller"))
    if batches is not None:
        batches = [b.to(engine.device) for b in batches]
    # the text encoders and the VAE, read for the dense references and the calibration, rest until the checks after
    # pruning: their file pages stop counting (at Stable Diffusion 1.5's size 0.8 GiB the scoring has no room for)
    page_out_beside_unet()
    if spec.pattern == "channel":  # structured: channels and heads physically removed (prune/structured/)
        from tinyprune.prune.structured.run import prune_structured

        plan = prune_structured(pipe, spec, batches, log, scores=scores, engine=engine)
        engine.agree("prune", models.values())
        return plan
    components = {}
    for comp, model in models.items():
        with engine.hosting(model) if comp == "unet" else nullcontext():
            weights = prunable_weights(model)
            masks, decisions, info = _masks(model, weights, spec, batches if comp == "unet" else None,
                                            pipe.noise_scheduler, log, engine)
            layers = apply_masks(model, masks)
        for name, w in weights.items():
            layers.setdefault(name, {"zeros": int((w == 0).sum()), "numel": w.numel()})
            layers[name].update(decisions.get(name, {}))
        achieved = plan_sparsity(layers)
        log(f"{comp}: {len(masks)} of {len(weights)} layers pruned, sparsity {achieved:.4f}")
        components[comp] = MaskedComponent(sparsity=achieved, layers={n: LayerPlan(**d) for n, d in layers.items()},
                                           **info)
    engine.agree("prune", models.values())
    return PrunePlan(spec.method, spec.pattern, spec.scope, spec.sparsity, components)
