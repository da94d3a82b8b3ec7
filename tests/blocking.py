"""A subprocess environment where some packages cannot be imported, as on a device that lacks them: a
sitecustomize.py on PYTHONPATH puts a finder first that refuses them and logs every attempt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEVICE_LACKS = ("torch", "diffusers", "transformers", "onnx", "onnxscript")

SITECUSTOMIZE = '''
import os, sys

class _Blocked:
    BLOCKED = {blocked!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            with open(os.environ["BLOCK_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{{name}} is not installed on this device")
        return None

sys.meta_path.insert(0, _Blocked())
'''


def blocked_imports(d: Path, blocked: tuple[str, ...] = DEVICE_LACKS) -> tuple[dict, Path]:
    """(env, log): run a subprocess with env and `blocked` cannot be imported; log lists what it tried."""
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=tuple(blocked)))
    log = d / "blocked.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(d), BLOCK_LOG=str(log), OMP_NUM_THREADS="2")
    probe = subprocess.run([sys.executable, "-c", f"import {blocked[0]}"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "is not installed on this device" in probe.stderr, probe.stderr
    log.unlink()
    return env, log
