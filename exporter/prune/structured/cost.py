"""Cost models of the structured allocation: what removing a unit saves (MACs, or measured onnxruntime time).

Cost: without `latency_aware` the cost is the unit's parameters (the currency of --sparsity) or MACs
(of --target-macs). With `latency_aware` it is the unit's share of its group's measured onnxruntime time
(`ort_cost_table`, the group's nodes in a profiled run of the dense UNet) or, without onnxruntime, its
MACs: groups that cost much time per parameter -- attention on small latents is many small operators --
are taken first, which is where a per-operator-bound runtime gets faster.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from tinyprune.model.families import Cond, flat_cond, repeat_cond
from tinyprune.model.families.base import UNetModule
from tinyprune.model.structure import Group, ValueOnlyAttention, get_module

# Every function here takes `cond`: the UNet's conditioning keyword arguments for one sample (the family's
# example_condition(1)), so that token counts and MACs see the family's real context length and added inputs.


# --------------------------------------------------------------------------- shapes and MACs

def _example(unet, batch: int = 1):
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    x = torch.zeros(batch, unet.config.in_channels, size, size)
    t = torch.full((batch,), 10, dtype=torch.long)
    return x, t


@torch.no_grad()
def token_counts(unet: nn.Module, groups: list[Group], cond: Cond) -> dict[str, dict]:
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
    _forward_once(unet, handles, cond)
    return seen


def _forward_once(unet: nn.Module, handles: list, cond: Cond) -> None:
    """One forward pass on an example input for the hooks in `handles` to see, which are removed after it."""
    try:
        x, t = _example(unet, 1)
        unet(x, t, **cond)
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
def count_macs(unet: nn.Module, cond: Cond) -> int:
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
    _forward_once(unet, handles, cond)
    return int(total[0])


# --------------------------------------------------------------------------- measured cost table

def onnx_scope(path: str) -> str:
    """The TorchScript exporter's node-name scope of a module path: 'a.0.b.1.c' -> 'a.0/b.1/c'."""
    return re.sub(r"\.(?!\d)", "/", path)


def ort_cost_table(unet: nn.Module, groups: list[Group], cond: Cond, batch: int = 2,
                   runs: int = 20, threads: int = 2) -> dict[str, float]:
    """Measured onnxruntime CPU time (ms per call) of each group's own nodes in the dense UNet: export
    once, run with profiling, sum kernel times of the nodes under the group's scope. A resnet's
    shortcut stays when its branch goes, so its nodes are not counted."""
    import json
    import warnings

    import onnxruntime as ort

    from diffusers.models.attention_processor import AttnProcessor

    flat = flat_cond(repeat_cond(cond, batch))
    x, t = _example(unet, batch)
    wrap = UNetModule(unet, tuple(flat), tuple(cond.get("added_cond_kwargs", {})))
    names = ["s", "t", *flat]
    procs = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "unet.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrap.eval(), (x, t.float(), *flat.values()), path, input_names=names,
                                  output_names=["o"], opset_version=17, dynamo=False)
        finally:
            unet.set_attn_processor(procs)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"s": x.numpy(), "t": t.float().numpy(), **{k: v.numpy() for k, v in flat.items()}}
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
