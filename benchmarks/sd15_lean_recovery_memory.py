"""Memory of the lean distillation's phases on an SD-1.5-sized UNet, without the hour of scoring before them:
random unit scores, 0.3 of the prunable parameters removed, the teacher's outputs recorded, surgery with the dense
pages handed back, lean distillation of STEPS steps; the peak RSS (VmHWM) of each phase.

    .venv/bin/python benchmarks/sd15_lean_recovery_memory.py WORK/sd15 STEPS     (WORK/sd15: sd15_scale.py's make)
"""
import sys, time, torch
from tinyprune.model.pipeline import load_pipeline
from tinyprune.model.calibration import CalibrationSet
from tinyprune.model.structure import find_groups
from tinyprune.prune.structured.allocation import Target, allocate
from tinyprune.prune.structured.groups import prunable_params
from tinyprune.prune.structured.surgery import remove_units
from tinyprune.prune import recovery as R
from tinyprune.runtime.measure import page_out_beside_unet, page_out_weights, reset_peak_rss, status_kb
torch.set_num_threads(2)
def gib(k): return round(status_kb(k) / 2**20, 2)
pipe = load_pipeline(sys.argv[1])
unet = pipe.unet
g = torch.Generator().manual_seed(0)
batches = CalibrationSet(torch.randn(2, 4, 16, 16, generator=g), pipe.family.calibration_conditions(2), "t").batches(pipe, 2)
page_out_beside_unet()
groups = find_groups(unet)
keep = allocate(groups, {x.path: torch.rand(x.units, generator=g) for x in groups}, Target("params", 0.3 * prunable_params(unet)))
reset_peak_rss(); t0 = time.time()
rec = R.record_teacher(unet.eval(), batches, scheduler=pipe.noise_scheduler, steps=int(sys.argv[2]))
print("record", len(rec.train), "draws", round(time.time() - t0), "s, peak", gib("VmHWM"), flush=True)
reset_peak_rss(); t0 = time.time()
remove_units(unet, keep, groups, after_each=lambda: page_out_weights(lambda p: "/unet/" in p))
print("surgery", round(time.time() - t0), "s, peak", gib("VmHWM"), "anon", gib("RssAnon"), "file", gib("RssFile"), flush=True)
reset_peak_rss(); t0 = time.time()
out = R.distill(unet, rec, batches, scheduler=pipe.noise_scheduler, steps=int(sys.argv[2]))
print("distill", out["steps"], "steps", round(time.time() - t0), "s, peak", gib("VmHWM"), "anon", gib("RssAnon"), "file", gib("RssFile"), flush=True)
