"""Cost models of the structured allocation: what removing a unit saves (MACs, or measured onnxruntime time).

Cost: without `latency_aware` the cost is the unit's parameters (the currency of --sparsity) or MACs
(of --target-macs). With `latency_aware` it is the unit's share of its group's measured onnxruntime time
(`ort_cost_table`, the group's nodes in a profiled run of the dense UNet) or, without onnxruntime, its
MACs: groups that cost much time per parameter -- attention on small latents is many small operators --
are taken first, which is where a per-operator-bound runtime gets faster.

The measured table is cached (keyed by the UNet's architecture, the conditioning's shapes, the profiling settings,
this CPU and the onnxruntime and torch versions; never by its weights, which do not change its time): the same
command on the same machine allocates from the same table and writes the same bundle. The table goes into the
plan, so a bundle says what its allocation read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CostTable:
    """Measured onnxruntime CPU time (ms per call, batch `batch`) of each group's own nodes and of the whole UNet."""

    groups: dict[str, float]
    total_ms: float
    key: str
    batch: int
    runs: int
    threads: int
    machine: str
    source: str = "measured"  # or "cache"

    def to_dict(self) -> dict:
        return {"key": self.key, "machine": self.machine, "batch": self.batch,
                "runs": self.runs, "threads": self.threads, "total_ms": self.total_ms,
                "groups_ms": dict(sorted(self.groups.items()))}


def cache_dir(kind: str = "cost_tables") -> Path:
    """Where measured figures are kept: $TINYPRUNE_CACHE, else ~/.cache/tinyprune."""
    return Path(os.environ.get("TINYPRUNE_CACHE") or Path.home() / ".cache" / "tinyprune") / kind


def read_cached(kind: str, key: str) -> dict | None:
    path = cache_dir(kind) / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_cached(kind: str, key: str, value: dict) -> None:
    path = cache_dir(kind) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)  # whole or not at all: a parallel run reads one version or the other


def table_key(unet: nn.Module, cond: Cond, batch: int, runs: int, threads: int) -> str:
    import onnxruntime as ort

    from tinyprune.runtime.measure import cpu_name

    arch = [(name, type(m).__name__, tuple(getattr(m, "weight").shape) if isinstance(getattr(m, "weight", None),
                                                                                    torch.Tensor) else None)
            for name, m in unet.named_modules()]
    shapes = {k: tuple(v.shape) for k, v in flat_cond(cond).items()}
    # without "_use_default_values", whose order is a set's
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    what = json.dumps([config, arch, shapes, batch, runs, threads, cpu_name(), ort.__version__,
                       torch.__version__, "no-spin"], sort_keys=True, default=str)
    return hashlib.sha256(what.encode()).hexdigest()[:20]


def export_unet_onnx(unet: nn.Module, cond: Cond, path: Path, batch: int = 2) -> dict:
    """The UNet as one ONNX file at `path` (opset 17, eager attention: the operators onnxruntime CPU runs), and
    the feed of one call of batch `batch` at the native latent size."""
    import warnings

    from diffusers.models.attention_processor import AttnProcessor

    flat = flat_cond(repeat_cond(cond, batch))
    x, t = _example(unet, batch)
    wrap = UNetModule(unet, tuple(flat), tuple(cond.get("added_cond_kwargs", {})))
    procs = getattr(unet, "attn_processors", None)  # UNet2DModel (DDPM) has no processor API: eager already
    if procs is not None:
        unet.set_attn_processor(AttnProcessor())
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrap.eval(), (x, t.float(), *flat.values()), str(path), input_names=["s", "t", *flat],
                              output_names=["o"], opset_version=17, dynamo=False)
    finally:
        if procs is not None:
            unet.set_attn_processor(procs)
    return {"s": x.numpy(), "t": t.float().numpy(), **{k: v.numpy() for k, v in flat.items()}}


def _session(path: Path, threads: int, profile_prefix: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # no spinning: interleaved sessions each keep a worker spinning after their call, which takes a core from the
    # other session's next call; on a machine with any other load the dense UNet then measured 14 ms instead of 7
    # and the ratio swung 1.2-2.2x between runs of the same allocation (benchmarks/results/speedup.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _fed(sess, feed: dict) -> dict:
    return {i.name: feed[i.name] for i in sess.get_inputs()}


def ort_cost_table(unet: nn.Module, groups: list[Group], cond: Cond, batch: int = 2,
                   runs: int = 20, threads: int = 2, cache: bool = True) -> CostTable:
    """Measured onnxruntime CPU time (ms per call) of each group's own nodes in the dense UNet: export
    once, run with profiling, sum kernel times of the nodes under the group's scope. A resnet's
    shortcut stays when its branch goes, so its nodes are not counted. From the cache when this machine has
    measured the same architecture (module docstring)."""
    from tinyprune.runtime.measure import cpu_name

    key = table_key(unet, cond, batch, runs, threads)
    d = read_cached("cost_tables", key) if cache else None
    if d is not None:
        if set(d["groups_ms"]) == {g.path for g in groups}:
            return CostTable(d["groups_ms"], d["total_ms"], key, batch, runs, threads, d["machine"], "cache")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.onnx"
        feed = export_unet_onnx(unet, cond, path, batch)
        sess = _session(path, threads, Path(tmp) / "prof")
        feed = _fed(sess, feed)
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
        table[g.path] = round(us / runs / 1000.0, 4)
    # rounded as the cache keeps them: a run that measured and one that read the cache allocate from equal numbers
    out = CostTable(table, round(sum(times.values()) / runs / 1000.0, 4), key, batch, runs, threads, cpu_name())
    if cache and out.total_ms > 0:
        write_cached("cost_tables", key, out.to_dict())
    return out


MEASURE_SECONDS = 3.0  # per timing: enough calls of a small UNet for its p50 to settle on a shared machine


def measured_speedup(dense: Path, pruned: Path, feed: dict, threads: int = 2, iters: int = 20) -> dict:
    """p50 of the dense UNet's ONNX file against the pruned one on onnxruntime CPU here, calls interleaved: at
    least `iters` of each, more for a small UNet (MEASURE_SECONDS in all, at most 400)."""
    import time

    from tinyprune.runtime.measure import cpu_name, interleaved, stats_ms

    a, b = _session(dense, threads), _session(pruned, threads)
    fa, fb = _fed(a, feed), _fed(b, feed)
    t0 = time.perf_counter()
    for _ in range(3):
        a.run(None, fa)
        b.run(None, fb)
    per_pair = (time.perf_counter() - t0) / 3
    iters = int(min(400, max(iters, MEASURE_SECONDS / max(per_pair, 1e-6))))
    times = interleaved({"dense": lambda: a.run(None, fa), "pruned": lambda: b.run(None, fb)}, warmup=2, iters=iters)
    p50 = {k: stats_ms(v)["p50_ms"] for k, v in times.items()}
    return {"backend": "ort-cpu", "machine": cpu_name(), "calls": iters, "threads": threads,
            "dense_p50_ms": p50["dense"], "p50_ms": p50["pruned"], "speedup": round(p50["dense"] / p50["pruned"], 3)}
