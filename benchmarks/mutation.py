"""Mutation testing of the code that judges (mutmut 3, configured in pyproject.toml's [tool.mutmut]).

    .venv/bin/pip install -e '.[mutation]' && .venv/bin/python benchmarks/mutation.py

mutmut derives a module's name from its path and imports the mutated copy from its own `mutants/` dir, so it needs
the source at the path of the import name; ours installs `exporter/` (+ `profiles/`, `calibration/`) as `tinyprune`.
The script therefore builds that layout in `.mutation/` (git-ignored): `tinyprune/` = exporter/ with the two data
packages inside, `tests/`, `pyproject.toml`; runs `mutmut run` there (the editable install's finder sits after
sys.path, so the mutated `tinyprune/` is the one the tests import), and writes the score and every surviving mutant
with its diff to benchmarks/results/mutation.md (+ .json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import command_line, relative_paths  # noqa: E402


def layout() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    pkg = WORK / "tinyprune"
    shutil.copytree(ROOT / "exporter", pkg, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "profiles", pkg / "profiles")
    shutil.copytree(ROOT / "calibration", pkg / "calibration_data")
    shutil.copytree(ROOT / "tests", WORK / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", WORK / "pyproject.toml")


def mutmut(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    # mutmut forks a child per mutant after the parent ran the tests: an OpenMP pool (torch's) started before a fork
    # hangs the child, which mutmut would count as a timeout (a "kill"); one thread starts no pool
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=WORK, text=True, env=env,
                          capture_output=capture)


def main(argv: list[str] | None = None) -> int:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    t0 = time.monotonic()
    layout()
    run = mutmut("run")
    if run.returncode not in (0, 1):
        print(f"mutmut run exited {run.returncode}", file=sys.stderr)
        return run.returncode
    mutmut("export-cicd-stats")
    stats = json.loads((WORK / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = mutmut("results", capture=True).stdout  # every mutant that was not killed: "    name: status"
    survivors = [line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line]
    diffs = {name: mutmut("show", name, capture=True).stdout for name, _ in survivors}
    # a mutant no selected test reaches counts against the score, as one that survives does
    counted = stats["total"] - stats.get("skipped", 0)
    killed = stats["killed"] + stats.get("timeout", 0)
    score = killed / counted if counted else 0.0
    rel = relative_paths(WORK, ROOT / "benchmarks" / "results")
    cmd = command_line("benchmarks/mutation.py", argv, rel)
    md = [f"# Mutation testing of the judging code: {score:.1%} killed\n",
          f"Command: `{cmd}` ({time.monotonic() - t0:.0f} s, mutmut 3, 2 cores). Modules: "
          + ", ".join(f"`{m}`" for m in cfg["only_mutate"]) + ". Tests: "
          + " ".join(f"`{t}`" for t in cfg["pytest_add_cli_args_test_selection"]) + ".\n",
          "| total | killed | survived | timeout | no tests | suspicious | skipped |", "|---|---|---|---|---|---|---|",
          f"| {stats['total']} | {stats['killed']} | {stats['survived']} | {stats.get('timeout', 0)} | "
          f"{stats.get('no_tests', 0)} | {stats.get('suspicious', 0)} | {stats.get('skipped', 0)} |\n",
          "Score = (killed + timed out) / (total - skipped): a mutant that no selected test reaches counts as a "
          "survivor.\n", "## Survivors (and mutants no test reaches)\n"]
    md += [f"### {name} ({status})\n\n```diff\n{rel(diffs[name]).strip()}\n```\n" for name, status in survivors] \
        or ["none\n"]
    out = ROOT / "benchmarks" / "results" / "mutation"
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "stats": stats, "score": score,
                                                    "survivors": dict(survivors)}, indent=2) + "\n")
    print(f"{score:.1%} of {counted} mutants killed; {len(survivors)} not: {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
