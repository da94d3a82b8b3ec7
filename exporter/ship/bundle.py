"""Bundle layout, manifest with sha256 of every file, atomic publish (verify.py checks a bundle against them)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from tinyprune.errors import InputError

MANIFEST = "manifest.json"
# Wall-clock times differ run to run; they live in this one file, outside the checksummed set, so that
# the same inputs give byte-identical bundles otherwise.
TIMINGS = "report/timings.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, TIMINGS)
    }


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically: a temp file beside it, fsync, os.replace.

    A reader (or a run killed midway) sees the old file or the new one, never half of one; on any failure the
    temp file is removed and `path` is untouched. The new file gets the usual umask mode, like open(path, "w").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not every platform or filesystem can fsync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse before any work is done: an existing --out without --force, or an unwritable parent.

    First clears what killed earlier runs left beside `out` (clean_stale), which may put a previous
    bundle back in place."""
    clean_stale(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is a file, not a directory: --out {out} cannot be created inside it")
    if not parent.is_dir():
        raise InputError(f"parent directory {parent} of --out does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: permission denied")


@contextmanager
def staged(out: Path, force: bool):
    """Yield a temporary sibling dir; on success it replaces `out` by rename, on any failure it vanishes.

    An interrupted run leaves either the old bundle or the new one at `out`, never half of one.
    """
    check_out_dir(out, force)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # one clear line in the CLI (cli.run): the disk, where, and that --out is untouched
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(e.filename or out)) from None
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what killed runs (SIGKILL, OOM killer, power loss) left beside `out`; returns what was done.

    `.NAME.partial-PID` of a dead PID is half a bundle: removed. `.NAME.old-PID` of a dead PID is the
    previous bundle, moved aside just before the final rename: put back when `out` is missing (the run
    died between the two renames), else removed. Dirs of live PIDs (a concurrent run) are left alone.
    """
    done = []
    parent = out.parent
    if not parent.is_dir():
        return done
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in sorted(parent.glob(prefix + "*")):
            pid = path.name[len(prefix):]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)) or not path.is_dir():
                continue
            if kind == "old" and not out.exists():
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)
            done.append(path)
    return done


def write_manifest(root: Path, manifest: dict) -> dict:
    """manifest.json with the sha256 of every file under `root`; replaced atomically (write_json), so a bundle
    being rewritten in place (`tinyprune build`) keeps its old manifest if the write fails."""
    manifest = dict(manifest, files=file_table(root))
    write_json(root / MANIFEST, manifest)
    return manifest


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    if Path(bundle).is_file():
        raise InputError(f"{bundle} is a file; expected a bundle directory (the --out of tinyprune export)")
    if not Path(bundle).is_dir():
        raise InputError(f"bundle {bundle} does not exist or is not a directory")
    if not path.is_file():
        raise InputError(f"{bundle} is not a tinyprune bundle: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
