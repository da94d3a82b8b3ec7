"""A real `tinyprune export` subprocess interrupted mid-export: SIGINT / SIGTERM leave no partial bundle and the
older bundle at --out intact; SIGKILL leaves its staging dir by nature, and the next run clears it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _export(tiny_dir, out: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinyprune.cli", "export", "--model", str(tiny_dir), "--out", str(out), "--force",
           "--image-checks", "1", "--image-steps", "2", *extra]
    # SIGINT back to its default in the child: a suite started as a background job of a non-interactive shell
    # (`bash .ci/run &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (seen here)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=_default_sigint)


def _wait_for_staging(proc: subprocess.Popen, out: Path, timeout: float = 300) -> Path:
    """Poll until the `.NAME.partial-PID` staging dir of `proc` exists (the export is under way)."""
    staging = out.parent / f".{out.name}.partial-{proc.pid}"
    deadline = time.monotonic() + timeout
    while not staging.is_dir():
        assert proc.poll() is None, f"export ended before its staging dir appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, "staging dir never appeared"
        time.sleep(0.02)
    return staging


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def old_bundle(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle[0], out)
    return out, (out / "manifest.json").read_bytes(), sorted(p.relative_to(out) for p in out.rglob("*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupt_leaves_old_bundle(tiny_dir, old_bundle, sig, code):
    out, manifest, listing = old_bundle
    proc = _export(tiny_dir, out)
    staging = _wait_for_staging(proc, out)
    # into the ONNX export, not only the mkdir: a signal timed by the clock could land in the pipeline's save,
    # whose shard writer was seen finishing the run on a loaded machine (the interrupt lost there)
    seen = []
    while not any("export unet ..." in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; nothing was published"
    assert "Traceback" not in stderr
    assert not staging.exists() and _siblings(out) == []
    assert (out / "manifest.json").read_bytes() == manifest
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing


def test_sigkill_then_next_run_cleans_up(tiny_dir, old_bundle):
    out, manifest, _ = old_bundle
    proc = _export(tiny_dir, out)
    staging = _wait_for_staging(proc, out)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # SIGKILL cannot be caught: the half-written staging dir stays, the old bundle is untouched
    assert staging.is_dir() and _siblings(out) == [staging.name]
    assert (out / "manifest.json").read_bytes() == manifest
    # the next run removes the dead run's staging dir and publishes a complete bundle
    proc = _export(tiny_dir, out)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert _siblings(out) == []
    r = subprocess.run([sys.executable, "-m", "tinyprune.cli", "verify", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_dirs_of_dead_runs(old_bundle, tmp_path):
    """Unit-level: a dead run's partial dir is removed, a live one's kept; a dead run's `.old-PID` (killed
    between its two renames, --out missing) is put back as the bundle."""
    from tinyprune.ship.bundle import check_out_dir, clean_stale

    out, manifest, _ = old_bundle
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".b.partial-{dead}").mkdir()
    (tmp_path / f".b.partial-{dead}" / "half.onnx").write_bytes(b"x")
    (tmp_path / f".b.partial-{live}").mkdir()
    (tmp_path / ".b.partial-notapid").mkdir()
    os.rename(out, tmp_path / f".b.old-{dead}")
    done = clean_stale(out)
    assert sorted(p.name for p in done) == sorted([f".b.partial-{dead}", f".b.old-{dead}"])
    assert (out / "manifest.json").read_bytes() == manifest
    assert _siblings(out) == sorted([f".b.partial-{live}", ".b.partial-notapid"])
    # check_out_dir runs it first: the restored bundle is then refused without --force
    from tinyprune.errors import InputError

    os.rename(out, tmp_path / f".b.old-{dead}")
    with pytest.raises(InputError, match="already exists; pass --force"):
        check_out_dir(out, force=False)
