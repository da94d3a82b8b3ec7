"""The demo's `export --method diff-pruning --speedup 2 --target x86-cpu` with the lean distillation forced (the one a
UNet past config.LARGE_UNET_BYTES gets, prune/recovery.py): its quality on the one pipeline where quality is measured,
beside the standard distillation's (the same command without this script).

    .venv/bin/python benchmarks/lean_recovery.py OUT [POOL_DRAWS [LR]]

POOL_DRAWS: the most training draws whose teacher outputs are recorded; LR: Adafactor's starting rate (defaults:
prune/recovery.py's POOL_DRAWS and LEAN_LR). The export's
report (OUT/report/report.md) has the FD ratio and class accuracy; exit 1 when a gate fails, as export's.
"""

import sys

from tinyprune.prune import recovery as R

R.lean_distillation = lambda unet, engine=None: True
if len(sys.argv) > 2:
    R.POOL_DRAWS = int(sys.argv[2])
if len(sys.argv) > 3:
    R.LEAN_LR = float(sys.argv[3])
from tinyprune.cli import app  # noqa: E402 (after the patch, which the prune stage reads when it runs)

sys.argv = ["tinyprune", "export", "--method", "diff-pruning", "--speedup", "2", "--target", "x86-cpu",
            "--out", sys.argv[1], "--force", "--json"]
app()
