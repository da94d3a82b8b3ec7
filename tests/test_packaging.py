"""A plain (non-editable) `pip install .` carries the profiles, calibration lists, demo pipeline (every file) and
every stage package, and installs nothing under a name other than tinyprune."""

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
        "from tinyprune.model.pipeline import demo_dir;"
        "print(json.dumps([tinyprune.__file__, len(list_profiles()),"
        " sorted(str(p.relative_to(demo_dir())) for p in demo_dir().rglob('*') if p.is_file())]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    import json

    location, n_profiles, demo_files = json.loads(proc.stdout)
    assert location.startswith(str(target))
    assert n_profiles == 9
    shipped = sorted(str(p.relative_to(ROOT / "exporter" / "demo" / "pipeline"))
                     for p in (ROOT / "exporter" / "demo" / "pipeline").rglob("*") if p.is_file())
    assert demo_files == shipped  # every file of the demo pipeline, the tokenizer's and prompts.txt included
    assert {"model_index.json", "prompts.txt", "text_encoder/model.safetensors", "tokenizer/merges.txt"} <= set(shipped)
    # bin/ holds the console script, not an importable name
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top_level == {"tinyprune"}, top_level
    installed = {p.parent.relative_to(target / "tinyprune") for p in (target / "tinyprune").rglob("__init__.py")}
    in_tree = {p.parent.relative_to(ROOT / "exporter") for p in (ROOT / "exporter").rglob("__init__.py")}
    assert in_tree <= installed, f"stage packages missing from pyproject's packages: {in_tree - installed}"
    assert (target / "tinyprune" / "cli.py").read_text() == (ROOT / "cli.py").read_text()
