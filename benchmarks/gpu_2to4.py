"""fp16 UNet, dense vs 2:4 through torch.sparse.to_sparse_semi_structured (cuSPARSELt), side by side.

What it measures, in one run on one GPU:
  1. a plain microbenchmark of big Linear layers (dense fp16 GEMM vs the semi-structured sparse one), to show
     the kernel itself works and what it gives at its best;
  2. an SD-1.5-sized UNet2DConditionModel built from diffusers' SD-1.5 unet config values (block_out_channels
     (320, 640, 1280, 1280), cross_attention_dim 768, attention_head_dim 8, layers_per_block 2, sample_size
     64), random weights, at batch 8 with 64x64 latents and a 77-token context;
  3. the demo UNet (exporter/demo/pipeline/unet when present, else the same architecture from demo/train.py's
     recipe) at batch 8 and 8x8 latents.

Every Linear layer gets a 2:4 magnitude mask along in-features; the "dense" model holds the same masked
weights as ordinary tensors, the "sparse" one as semi-structured tensors, so the two compute the same
function (max output difference is reported). Conv layers stay dense in both: to_sparse_semi_structured
covers 2-D matmuls (nn.Linear) only, there is no semi-structured convolution in PyTorch -- TensorRT's sparse
convolution tactics are the way to put the UNet's convs on sparse tensor cores. Timing: CUDA events, warm-up,
then dense and sparse interleaved (alternating order) in repeated rounds; medians reported.

Each pair is timed twice: eagerly (what a PyTorch user gets: torch's cuSPARSELt binding sets up a matmul
plan on every call, ~0.5 ms of host work per sparse Linear here, which the GPU waits for) and as CUDA-graph
replays (host out of the loop: the kernels' own time, closer to what a TensorRT engine would see).

Run: python benchmarks/gpu_2to4.py --out results.json   (needs CUDA, torch with cuSPARSELt, diffusers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive in-features (TensorRT's and cuSPARSELt's axis)."""
    g = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)
    return keep.view_as(w)


class SparseLinear(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach().contiguous()),
                                         requires_grad=False)
        self.bias = lin.bias
        self.out_features = lin.out_features

    def forward(self, x):
        # cuSPARSELt returns the product transposed in memory; attention kernels (flash / cuDNN SDPA) refuse
        # inputs whose last dim is not contiguous and fall back to the fp32 math path (seen in
        # gpu_2to4_profile.py: 4x slower UNet). One copy here keeps the rest of the network on its fast path.
        return F.linear(x.contiguous(), self.weight, self.bias).contiguous()


def timed_pair(fa, fb, warmup: int = 3, rounds: int = 10, iters: int = 5) -> tuple[float, float, list, list]:
    """Median ms per call of fa and fb, measured interleaved (order alternating each round)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fa(), fb()
        torch.cuda.synchronize()
        ta, tb = [], []
        for r in range(rounds):
            for f, acc in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(iters):
                    f()
                e.record()
                e.synchronize()
                acc.append(s.elapsed_time(e) / iters)
    return statistics.median(ta), statistics.median(tb), ta, tb


def graphed(fn):
    """fn captured in a CUDA graph (warm-up on a side stream first); returns the replay callable.
    Replays take the host out of the loop: what is left is the GPU time of the kernels themselves."""
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def _graph_pair(fa, fb, **kw) -> dict:
    try:
        d, s, _, _ = timed_pair(graphed(fa), graphed(fb), **kw)
        return {"graph_dense_ms": round(d, 4), "graph_sparse_ms": round(s, 4), "graph_speedup": round(d / s, 3)}
    except Exception as e:
        return {"graph_error": f"{type(e).__name__}: {e}"[:200]}


def micro(rows: int, k: int, n: int, backend: str) -> dict:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    w = w * two_four_mask(w)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    ws = to_sparse_semi_structured(w)
    err = float((F.linear(x, w) - F.linear(x, ws)).abs().max())
    d, s, _, _ = timed_pair(lambda: F.linear(x, w), lambda: F.linear(x, ws), rounds=10, iters=20)
    flops = 2 * rows * k * n
    return {"shape": f"[{rows}x{k}] @ [{k}x{n}]", "backend": type(ws).__name__, "dense_ms": round(d, 4),
            "sparse_ms": round(s, 4), "speedup": round(d / s, 3), "dense_tflops": round(flops / d / 1e9, 1),
            "max_abs_diff": err, **_graph_pair(lambda: F.linear(x, w), lambda: F.linear(x, ws), rounds=10, iters=20)}


def sparsify_linears(model: torch.nn.Module) -> dict:
    """Mask every Linear to 2:4 in place; returns the names that can go semi-structured."""
    linears, convs = 0, 0
    names = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears += m.weight.numel()
            if m.in_features % 64 == 0 and m.out_features % 32 == 0:  # conservative cuSPARSELt fp16 shapes
                with torch.no_grad():
                    m.weight.mul_(two_four_mask(m.weight))
                names.append(name)
        elif isinstance(m, torch.nn.Conv2d):
            convs += m.weight.numel()
    return {"names": names, "linear_params": linears, "conv_params": convs}


def swap_in_sparse(model: torch.nn.Module, names: list[str]) -> tuple[int, list[str]]:
    done, failed = 0, []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            parent._modules[child] = SparseLinear(parent._modules[child])
            done += 1
        except Exception as e:  # a shape the backend refuses stays dense, and we say so
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:80]}")
    return done, failed


def unet_case(label: str, unet, batch: int, size: int, ctx_len: int, backend: str) -> dict:
    import copy

    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    unet = unet.to("cuda", torch.float16).eval().requires_grad_(False)
    info = sparsify_linears(unet)
    sparse = copy.deepcopy(unet)
    n_sparse, failed = swap_in_sparse(sparse, info["names"])
    g = torch.Generator(device="cuda").manual_seed(0)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, size, size, device="cuda", dtype=torch.float16, generator=g)
    t = torch.full((batch,), 500, device="cuda", dtype=torch.long)
    c = torch.randn(batch, ctx_len, cfg.cross_attention_dim, device="cuda", dtype=torch.float16, generator=g)
    with torch.inference_mode():
        a = unet(x, t, encoder_hidden_states=c).sample
        b = sparse(x, t, encoder_hidden_states=c).sample
    diff = float((a - b).abs().max())
    d, s, ta, tb = timed_pair(lambda: unet(x, t, encoder_hidden_states=c), lambda: sparse(x, t, encoder_hidden_states=c))
    total = info["linear_params"] + info["conv_params"]
    out = {"case": label, "batch": batch, "latent": f"{size}x{size}", "backend": backend,
           "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
           "linear_share_of_weights": round(info["linear_params"] / total, 3),
           "linears_semi_structured": n_sparse, "linears_refused": failed[:5], "n_refused": len(failed),
           "dense_ms": round(d, 3), "sparse_ms": round(s, 3), "speedup": round(d / s, 3),
           "dense_rounds_ms": [round(v, 3) for v in ta], "sparse_rounds_ms": [round(v, 3) for v in tb],
           "max_abs_output_diff": diff, "output_abs_max": float(a.abs().max()),
           **_graph_pair(lambda: unet(x, t, encoder_hidden_states=c), lambda: sparse(x, t, encoder_hidden_states=c))}
    del sparse, unet
    torch.cuda.empty_cache()
    return out


def _safe(fn, label, *args):
    try:
        return fn(label, *args)
    except Exception as e:  # one failing case must not lose the others' numbers
        import traceback

        traceback.print_exc()
        return {"case": label, "error": f"{type(e).__name__}: {e}"[:300]}


def demo_unet():
    from diffusers import UNet2DConditionModel

    root = Path(__file__).resolve().parents[1]
    path = root / "exporter" / "demo" / "pipeline" / "unet"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return UNet2DConditionModel.from_pretrained(path, use_safetensors=True), "demo UNet (trained weights)"
    sys.path.insert(0, str(root))
    from tinyprune.demo.train import RECIPE, build_unet

    return build_unet(RECIPE["unet"], RECIPE["text"]["hidden_size"]), "demo UNet architecture (random weights; demo not trained yet)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_2to4.json")
    ap.add_argument("--skip-sd", action="store_true")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
           "torch": torch.__version__, "cusparselt": bool(torch.backends.cusparselt.is_available()),
           "cusparselt_version": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None}
    print(json.dumps(res), flush=True)
    res["micro"] = []
    # CUTLASS's semi-structured kernels are sm_8x only (on an H100 they raise), so cuSPARSELt alone here
    for backend in ("cusparselt", "cutlass") if torch.cuda.get_device_capability()[0] == 8 else ("cusparselt",):
        for rows, k, n in ((16384, 8192, 8192), (32768, 320, 2560), (8192, 1280, 10240), (8192, 5120, 1280)):
            try:
                r = micro(rows, k, n, backend)
            except Exception as e:
                r = {"shape": f"[{rows}x{k}] @ [{k}x{n}]", "backend": backend, "error": f"{type(e).__name__}: {e}"[:200]}
            res["micro"].append(r)
            print(json.dumps(r), flush=True)
    res["unet"] = []
    if not args.skip_sd:
        with torch.device("cuda"):
            torch.manual_seed(0)
            sd = UNet2DConditionModel(**SD15)
        r = _safe(unet_case, "SD-1.5-sized UNet (random weights)", sd, 8, 64, 77, "cusparselt")
        del sd
        res["unet"].append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("rounds_ms")}), flush=True)
    demo, label = demo_unet()
    for batch in (8, 128):
        r = _safe(unet_case, label, __import__("copy").deepcopy(demo), batch, demo.config.sample_size, 1, "cusparselt")
        res["unet"].append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("rounds_ms")}), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
