"""report/report.json and report/report.md of a bundle."""

from __future__ import annotations

from pathlib import Path

from .bundle import write_json


def speedup_source(profile, pattern: str) -> str:
    if pattern == "2:4" and profile.sparse_tensor_cores:
        return "2:4 sparse tensor cores (TensorRT picks sparse kernels where they are faster; see build log)"
    if profile.sparse_tensor_cores:
        return "none: unstructured zeros run dense; 2:4 (--pattern 2:4) would use this target's sparse tensor cores"
    return "none from zeros on this target: only structured pruning (fewer channels/heads) is faster here"


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def write_report(root: Path, report: dict) -> None:
    write_json(root / "report" / "report.json", report)
    lines = [
        f"# tinyprune report: {report['model']} for {report['profile']}",
        "",
        f"- method `{report['method']}`, pattern `{report['pattern']}`, requested sparsity {report['requested_sparsity']}",
        f"- speed-up source on this target: {report['speedup_source']}",
    ]
    lines += [f"- notice: {n}" for n in report.get("notices", [])]
    lines += ["", "## Sparsity (prunable Conv/Linear weights)", "", "| component | sparsity |", "|---|---|"]
    lines += [f"| {c} | {s:.4f} |" for c, s in report["sparsity"].items()]
    lines += ["", "## ONNX vs PyTorch drift (onnxruntime CPU)", "",
              "| output | max abs | mean abs | tolerance | ok |", "|---|---|---|---|---|"]
    lines += [f"| {d['name']} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | {d['tolerance']:.3g} | {'yes' if d['ok'] else 'NO'} |"
              for d in report["onnx_drift"]]
    img = report["image_drift"]
    lines += ["", "## Dense vs pruned final images (same seeds and initial noise)", "",
              f"PSNR {_fmt(img['psnr_db'])} dB (gate >= {img['min_psnr_db']} dB), max abs {img['max_abs']:.3g}: "
              f"{'ok' if img['ok'] else 'FAILED'}"]
    if report.get("runtime_drift"):
        lines += ["", "## Torch-free runtime vs PyTorch (same seed, labels and initial noise; `python -m exporter.runtime`)",
                  "", "| check | PSNR dB | max abs | gate | ok |", "|---|---|---|---|---|"]
        for d in report["runtime_drift"]:
            if d.get("skipped"):
                lines += [f"| {d['name']} | skipped | - | >= {d['min_psnr_db']} dB | - |"]
            else:
                lines += [f"| {d['name']} | {_fmt(d['psnr_db'])} | {d['max_abs']:.3g} | >= {d['min_psnr_db']} dB | "
                          f"{'yes' if d['ok'] else 'NO'} |"]
    lines += ["", f"**Result: {'all gates passed' if report['ok'] else 'a gate FAILED'}**", ""]
    (root / "report" / "report.md").write_text("\n".join(lines))
