"""A plain (non-editable) `pip install .` carries the profiles, calibration lists, demo pipeline and every stage package,
and installs nothing under a name other than tinyprune."""

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
        "import tinyprune, tinyprune.cli, json;"
        "from tinyprune.config import list_profiles;"
        "from tinyprune.model.calibration import default_classes;"
        "from tinyprune.model.pipeline import demo_dir;"
        "print(json.dumps([tinyprune.__file__, len(list_profiles()), default_classes(),"
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
    # bin/ holds the console script, not an importable name
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top_level == {"tinyprune"}, top_level
    installed = {p.parent.relative_to(target / "tinyprune") for p in (target / "tinyprune").rglob("__init__.py")}
    in_tree = {p.parent.relative_to(ROOT / "exporter") for p in (ROOT / "exporter").rglob("__init__.py")}
    assert in_tree <= installed, f"stage packages missing from pyproject's packages: {in_tree - installed}"
    assert (target / "tinyprune" / "cli.py").read_text() == (ROOT / "cli.py").read_text()
