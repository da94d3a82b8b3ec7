"""A plain (non-editable) `pip install .` must carry the profiles, calibration lists and the demo pipeline."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_ships_package_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    code = (
        "import exporter, json;"
        "from exporter.config import list_profiles;"
        "from exporter.calibration import default_classes;"
        "from exporter.pipeline import demo_dir;"
        "print(json.dumps([exporter.__file__, len(list_profiles()), default_classes(),"
        " sorted(p.name for p in demo_dir().iterdir())]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    import json

    location, n_profiles, classes, demo_files = json.loads(proc.stdout)
    assert location.startswith(str(target))
    assert n_profiles == 9
    assert classes == list(range(10))
    assert {"model_index.json", "unet", "vae", "scheduler", "class_embedder"} <= set(demo_files)
