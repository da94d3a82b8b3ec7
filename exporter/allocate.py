"""Which units of which groups go: scores + costs -> kept unit indices, to a parameter or MAC target.

Targets. `sparsity` is the fraction of the UNet's prunable parameters (Conv2d + Linear weight elements,
the count masks.prunable_weights sums) that must be gone; `target_macs` is the fraction of the dense
UNet's multiply-accumulates (per sample, at the native latent size) that may remain. Parameters already
gone before allocation (the exact single-token attention collapse) count towards the target.

Global allocation (scope "global"): every unit has a score (higher = more important: the importance
function's estimate of the damage its removal does), a gain (what its removal counts towards the target:
parameters or MACs) and a cost (what its removal saves: the gain, or its latency when latency-aware).
Units go in increasing order of priority until the target is met, where by `normalize`
  "mean"  priority = score / mean score of its group * gain / cost -- Torch-Pruning's global pruning with
          its group normaliser: groups compete by relative importance, so the cut spreads over all groups;
          latency-aware, each group is weighted by how much time per parameter it saves;
  "none"  priority = score / cost -- a knapsack ratio on the raw scores, which for these methods are on
          one scale (a loss change, an output-statistics change, a gate probability): whole unimportant
          groups go first.
Within a group all units have the same gain and cost, so they go in score order, and a group can empty
completely (it is then replaced, see groups.py).

Cost: without `latency_aware` the cost is the unit's parameters (the currency of --sparsity) or MACs
(of --target-macs). With `latency_aware` it is the unit's share of its group's measured onnxruntime time
(`ort_cost_table`, the group's nodes in a profiled run of the dense UNet) or, without onnxruntime, its
MACs: groups that cost much time per parameter -- attention on small latents is many small operators --
are taken first, which is where a per-operator-bound runtime gets faster.

Scope "layer": the same fraction of units in every group (Diff-Pruning's own uniform allocation),
the fraction found by bisection to meet the target.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .groups import Group, ValueOnlyAttention, get_module


# --------------------------------------------------------------------------- shapes and MACs

def _example(unet, batch: int = 1, context_tokens: int = 1):
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    x = torch.zeros(batch, unet.config.in_channels, size, size)
    t = torch.full((batch,), 10, dtype=torch.long)
    ctx = torch.zeros(batch, context_tokens, unet.config.cross_attention_dim)
    return x, t, ctx


@torch.no_grad()
def token_counts(unet: nn.Module, groups: list[Group], context_tokens: int = 1) -> dict[str, dict]:
    """Per group, the spatial size (resnet: H*W of conv1's output; attention: query and key tokens;
    feed-forward: tokens) in one batch-1 forward at the native latent size."""
    seen, handles = {}, []
    for g in groups:
        m = get_module(unet, g.path)
        if g.kind == "resnet":
            def hook(mod, args, out, p=g.path):
                seen[p] = {"hw": out.shape[-1] * out.shape[-2]}
            handles.append(m.conv1.register_forward_hook(hook))
        elif g.kind == "attention":
            def hook(mod, args, kwargs, p=g.path):
                h = args[0] if args else kwargs["hidden_states"]
                n = h.shape[1] if h.dim() == 3 else h.shape[-1] * h.shape[-2]
                e = kwargs.get("encoder_hidden_states")
                seen[p] = {"n": n, "m": n if e is None else e.shape[1]}
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, p=g.path):
                seen[p] = {"n": args[0].shape[1]}
            handles.append(m.register_forward_pre_hook(hook))
    _forward_once(unet, handles, context_tokens)
    return seen


def _forward_once(unet: nn.Module, handles: list, context_tokens: int) -> None:
    """One forward pass on an example input for the hooks in `handles` to see, which are removed after it."""
    try:
        x, t, ctx = _example(unet, 1, context_tokens)
        unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()


def unit_macs(unet: nn.Module, groups: list[Group], tokens: dict[str, dict]) -> dict[str, float]:
    """Multiply-accumulates per sample that one unit of each group costs."""
    out = {}
    for g in groups:
        m, s = get_module(unet, g.path), tokens[g.path]
        if g.kind == "resnet":
            macs = g.width * s["hw"] * (m.conv1.weight[0].numel() + m.conv2.weight[:, 0].numel())
            if m.time_emb_proj is not None:
                macs += g.width * m.time_emb_proj.in_features
        elif g.kind == "attention":
            n, k = s["n"], s["m"]
            if isinstance(m, ValueOnlyAttention):
                macs = g.width * (m.to_v.in_features + m.to_out[0].out_features)  # on one token
            else:
                macs = g.width * (m.to_q.in_features * n + (m.to_k.in_features + m.to_v.in_features) * k
                                  + 2 * n * k + m.to_out[0].out_features * n)
        else:
            proj, out_layer = m.net[0].proj, m.net[2]
            macs = s["n"] * (proj.weight.shape[0] // out_layer.in_features * g.width * proj.in_features
                             + g.width * out_layer.out_features)
        out[g.path] = float(macs)
    return out


@torch.no_grad()
def count_macs(unet: nn.Module, context_tokens: int = 1) -> int:
    """MACs per sample of one UNet call at the native latent size: Conv2d, Linear and attention products."""
    from diffusers.models.attention_processor import Attention

    total, handles = [0], []

    def conv(mod, args, out):
        total[0] += out[0].numel() * mod.weight[0].numel()

    def linear(mod, args, out):
        total[0] += out[0].numel() * mod.in_features

    def attn(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        n = h.shape[1] if h.dim() == 3 else h.shape[-1] * h.shape[-2]
        e = kwargs.get("encoder_hidden_states")
        k = n if e is None else e.shape[1]
        total[0] += 2 * n * k * mod.inner_dim

    for m in unet.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_pre_hook(attn, with_kwargs=True))
    _forward_once(unet, handles, context_tokens)
    return int(total[0])


# --------------------------------------------------------------------------- measured cost table

def onnx_scope(path: str) -> str:
    """The TorchScript exporter's node-name scope of a module path: 'a.0.b.1.c' -> 'a.0/b.1/c'."""
    return re.sub(r"\.(?!\d)", "/", path)


def ort_cost_table(unet: nn.Module, groups: list[Group], batch: int = 2, context_tokens: int = 1,
                   runs: int = 20, threads: int = 2) -> dict[str, float]:
    """Measured onnxruntime CPU time (ms per call) of each group's own nodes in the dense UNet: export
    once, run with profiling, sum kernel times of the nodes under the group's scope. A resnet's
    shortcut stays when its branch goes, so its nodes are not counted."""
    import json
    import warnings

    import onnxruntime as ort

    from diffusers.models.attention_processor import AttnProcessor

    class Wrap(nn.Module):
        def __init__(self, u):
            super().__init__()
            self.unet = u

        def forward(self, x, t, c):
            return self.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]

    x, t, ctx = _example(unet, batch, context_tokens)
    procs = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "unet.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(Wrap(unet).eval(), (x, t.float(), ctx), path, input_names=["s", "t", "c"],
                                  output_names=["o"], opset_version=17, dynamo=False)
        finally:
            unet.set_attn_processor(procs)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"s": x.numpy(), "t": t.float().numpy(), "c": ctx.numpy()}
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[e["name"]] = times.get(e["name"], 0.0) + e["dur"]
    table = {}
    for g in groups:
        scope = "/" + onnx_scope(g.path) + "/"
        us = sum(v for k, v in times.items() if scope in k and "/conv_shortcut/" not in k)
        table[g.path] = us / runs / 1000.0
    return table


# --------------------------------------------------------------------------- allocation

@dataclass(frozen=True)
class Target:
    kind: str  # "params": remove at least `amount` parameters | "macs": keep at most `amount` MACs
    amount: float


def _normalized(groups: list[Group], scores: dict[str, torch.Tensor], normalize: str) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        s = scores[g.path].detach().double().clamp_min(0)
        if normalize == "mean":
            s = s / s.mean().clamp_min(1e-30)
        out[g.path] = s
    return out


def allocate(groups: list[Group], scores: dict[str, torch.Tensor], target: Target, *,
             costs: dict[str, float] | None = None, macs: dict[str, float] | None = None,
             scope: str = "global", normalize: str = "mean", removed_before: float = 0.0,
             macs_total: float | None = None) -> dict[str, torch.Tensor]:
    """Kept unit indices per group. `costs`: per-unit cost for the priority (default: parameters for a
    params target, MACs for a MACs target). `macs`: per-unit MACs (needed for a MACs target);
    `removed_before`: parameters already removed; `macs_total`: the current model's MACs."""
    if target.kind == "macs" and (macs is None or macs_total is None):
        raise ValueError("a MACs target needs per-unit MACs and the model's total")
    gain = {g.path: float(g.params_per_unit if target.kind == "params" else macs[g.path]) for g in groups}
    need = target.amount - removed_before if target.kind == "params" else macs_total - target.amount
    norm = _normalized(groups, scores, normalize)
    order = {g.path: torch.argsort(norm[g.path], stable=True) for g in groups}
    limit = {g.path: g.units if g.removable else g.units - 1 for g in groups}
    if need <= 0:
        return {g.path: torch.arange(g.units) for g in groups}
    if scope == "layer":
        counts = _uniform(groups, gain, limit, need, norm, order)
    else:
        cost = costs or gain
        cands = []
        for g in groups:
            c = max(float(cost[g.path]), 1e-30)
            # "mean": relative scores, each group weighted by what a unit saves per unit of cost (1 unless
            # latency-aware); "none": absolute damage per unit of cost (a knapsack ratio)
            weight = gain[g.path] / c if normalize == "mean" else 1.0 / c
            for rank, u in enumerate(order[g.path][:limit[g.path]].tolist()):
                cands.append((float(norm[g.path][u]) * weight, g.path, rank))
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        counts, done, last = {g.path: 0 for g in groups}, 0.0, None
        for _, path, rank in cands:
            if done >= need:
                break
            # units of a group go in score order: a candidate is taken only after its group's lower ranks
            if rank != counts[path]:
                continue
            counts[path] += 1
            done += gain[path]
            last = path
        if last is not None and done - need > need - (done - gain[last]):  # the closer side of the target
            counts[last] -= 1
    return {g.path: order[g.path][counts[g.path]:].sort().values for g in groups}


def _uniform(groups, gain, limit, need, norm, order) -> dict[str, int]:
    """The largest common fraction of units under the target, then one more unit (the least important
    next one, in group order of score) from groups until the target is met: fractions differ by at most
    one unit."""
    def take(frac):
        return {g.path: min(limit[g.path], math.floor(frac * g.units)) for g in groups}

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(gain[p] * n for p, n in take(mid).items()) >= need:
            hi = mid
        else:
            lo = mid
    counts = take(lo)
    done = sum(gain[p] * n for p, n in counts.items())
    extra = sorted((float(norm[g.path][order[g.path][counts[g.path]]]), g.path) for g in groups
                   if counts[g.path] < limit[g.path])
    for _, path in extra:
        if done >= need:
            break
        if done + gain[path] - need > need - done:  # the closer side of the target
            continue
        counts[path] += 1
        done += gain[path]
    return counts


def removed_params(groups: list[Group], keep: dict[str, torch.Tensor]) -> int:
    return sum((g.units - len(keep.get(g.path, range(g.units)))) * g.params_per_unit for g in groups)
