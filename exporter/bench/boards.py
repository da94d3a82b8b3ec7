"""`tinyprune bench-merge`: several boards' runtime bench JSONs (python -m tinyprune.runtime bench) in one table
and one plot: a row per file (board, backend, precision, bundle), p50/p90 per component and per generation, peak
memory. The files are read as they are; one that is not a runtime bench result is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

from tinyprune.errors import InputError
from tinyprune.runtime.bench import FORMAT


def read_results(paths: list[Path]) -> list[dict]:
    if not paths:
        raise InputError("give at least one bench JSON (written by `python -m tinyprune.runtime bench BUNDLE --out F`)")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"{p} does not exist")
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p} is not valid JSON ({e})") from None
        if not isinstance(r, dict) or r.get("format") != FORMAT:
            raise InputError(f"{p} is not a runtime bench result (format {FORMAT!r})")
        out.append(r)
    return out


def _label(r: dict) -> str:
    return f"{r['device']['name']} {r['backend']} {r['precision']}"


def merge(results: list[dict]) -> dict:
    """{"components": [...], "rows": [{board, backend, precision, bundle, <component>_p50_ms, ...}]}."""
    components = []
    for r in results:
        components += [c for c in r["components"] if c not in components]
    rows = []
    for r in results:
        b, gen = r["bundle"], r["generation"]
        row = {"board": r["device"]["name"], "cpu": r["device"]["cpu"], "backend": r["backend"],
               "precision": r["precision"],
               "bundle": f"{b.get('source')} {b.get('method')} {b.get('pattern')} s={b.get('sparsity')}",
               "steps": r["settings"]["steps"]}
        for c in components:
            comp = r["components"].get(c)
            row[f"{c}_p50_ms"] = comp["p50_ms"] if comp else None
            row[f"{c}_p90_ms"] = comp["p90_ms"] if comp else None
        row.update({"generation_p50_ms": gen["p50_ms"], "generation_p90_ms": gen["p90_ms"],
                    "step_p50_ms": (gen.get("step") or {}).get("p50_ms"),
                    "generation_peak_rss_mb": gen.get("peak_rss_mb"), "label": _label(r)})
        rows.append(row)
    return {"components": components, "rows": rows}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def markdown(table: dict) -> str:
    comps = table["components"]
    head = ["board", "backend", "precision", "bundle", *(f"{c} p50/p90 ms" for c in comps),
            "generation p50/p90 ms", "step p50 ms", "generation peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["board"], r["backend"], r["precision"], r["bundle"],
                 *(f"{_ms(r[f'{c}_p50_ms'])} / {_ms(r[f'{c}_p90_ms'])}" for c in comps),
                 f"{_ms(r['generation_p50_ms'])} / {_ms(r['generation_p90_ms'])}", _ms(r["step_p50_ms"]),
                 _ms(r["generation_peak_rss_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> Path:
    """Bars of p50 per component and per generation, one colour per board; log scale (boards differ by 100x)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [*table["components"], "generation"]
    rows = table["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 4))
    x = np.arange(len(groups))
    for i, r in enumerate(rows):
        vals = [r.get(f"{g}_p50_ms") or 0 for g in groups]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=r["label"])
    ax.set_xticks(x, groups)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("tinyprune runtime bench, per board")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def merge_files(paths: list[Path], out: Path | None) -> dict:
    """Merge; with out, write out/boards.md, boards.json and boards.png."""
    table = merge(read_results(paths))
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        (out / "boards.md").write_text(markdown(table))
        (out / "boards.json").write_text(json.dumps(table, indent=2) + "\n")
        plot(table, out / "boards.png")
        table["files"] = [str(out / n) for n in ("boards.md", "boards.json", "boards.png")]
    return table
