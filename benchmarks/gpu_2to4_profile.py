"""Where the 2:4 SD-1.5-sized UNet spends its GPU time: torch.profiler kernel table, dense vs semi-structured.

Companion of gpu_2to4.py (same model, masks and swap); run on the GPU machine: python benchmarks/gpu_2to4_profile.py
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_2to4 import SD15, sparsify_linears, swap_in_sparse  # noqa: E402


def main(out: str) -> None:
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    with torch.device("cuda"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15).half().eval().requires_grad_(False)
    info = sparsify_linears(unet)
    sparse = copy.deepcopy(unet)
    swap_in_sparse(sparse, info["names"])
    x = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.full((8,), 500, device="cuda", dtype=torch.long)
    c = torch.randn(8, 77, 768, device="cuda", dtype=torch.float16)
    res = {}
    for label, m in (("dense", unet), ("sparse", sparse)):
        with torch.inference_mode():
            for _ in range(3):
                m(x, t, encoder_hidden_states=c)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    m(x, t, encoder_hidden_states=c)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
        print(f"== {label}\n{table}", flush=True)
        res[label] = table
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_2to4_profile.json")
