"""The same export command twice, in two fresh processes (different hash seeds), gives byte-identical ONNX files,
pruned pipeline, report and manifest; only report/timings.json (wall-clock times and peak memory) differs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyprune.runtime.measure import reset_peak_rss
from tinyprune.ship.bundle import MANIFEST, TIMINGS, file_table

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _export(tiny_dir, out: Path, hash_seed: str) -> None:
    cmd = [sys.executable, "-m", "tinyprune.cli", "export", "--model", str(tiny_dir), "--out", str(out), "--sparsity", "0.43",
           "--target", "jetson", "--image-checks", "2", "--image-steps", "3"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr


def test_same_command_same_bytes(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _export(tiny_dir, a, "1")
    _export(tiny_dir, b, "2")
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    table_a, table_b = file_table(a), file_table(b)
    assert table_a == table_b
    onnx_files = [rel for rel in table_a if rel.endswith(".onnx")]
    assert sorted(onnx_files) == ["text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx",
                                  "vae_encoder/model.onnx"]
    for rel in table_a:  # every checksummed file, byte for byte (not only its hash)
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # the manifest checksums everything but itself and the timings
    assert set(json.loads((a / MANIFEST).read_text())["files"]) == set(table_a)
    assert TIMINGS not in table_a and (a / TIMINGS).is_file()
    timings = json.loads((a / TIMINGS).read_text())
    assert set(timings) == {"seconds", "peak_rss_mb"}
    seconds = timings["seconds"]
    assert {"load", "prune"} <= set(seconds) and seconds["prune"] > 0  # a stage that ran took time
    # every stage has its peak RSS where the kernel's peak counter can be reset (Linux /proc), none elsewhere
    assert set(timings["peak_rss_mb"]) == (set(seconds) if reset_peak_rss() else set())
    assert all(v > 0 for v in timings["peak_rss_mb"].values())
