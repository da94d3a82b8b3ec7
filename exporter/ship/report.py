"""report/report.json and report/report.md of a bundle."""

from __future__ import annotations

from pathlib import Path

from tinyprune.prune.plan import MaskedComponent, PrunePlan
from tinyprune.ship.bundle import write_json


def speedup_source(profile, pattern: str, precision: str = "fp32") -> str:
    """Where a speed-up can come from on the target: the pruning's pattern, then the precision of the files."""
    if pattern == "channel":
        source = "structured: channels, heads and whole operators removed; a smaller network is faster on every runtime"
    elif pattern == "2:4" and profile.sparse_tensor_cores:
        source = "2:4 sparse tensor cores (TensorRT picks sparse kernels where they are faster; see build log)"
    elif profile.sparse_tensor_cores:
        source = "none: unstructured zeros run dense; 2:4 (--pattern 2:4) would use this target's sparse tensor cores"
    else:
        source = "none from zeros on this target: only structured pruning (fewer channels/heads) is faster here"
    return source + "; " + _precision_source(profile, precision)


def _precision_source(profile, precision: str) -> str:
    if precision == "int8" and profile.has_tensorrt:
        return ("precision: int8 tensor cores through TensorRT's explicit quantization (the QDQ scales; "
                "trtexec --int8)" + (", DLA int8" if profile.dla_cores else ""))
    if precision == "int8":
        return ("precision: onnxruntime's int8 kernels (VNNI or AVX2 on x86, dot-product on ARM); they pay on "
                "large UNets, not on small ones: the report's measured figure says which this is")
    if precision == "fp16":
        return "precision: fp16 tensor cores (weights and compute in fp16)"
    if profile.has_tensorrt and "fp16" in profile.precisions:
        return "precision: fp32 files; the engine build adds --fp16 where TensorRT's version takes it"
    return "precision: fp32"


def _fmt(x) -> str:
    """A figure of a result's to_dict(); None there is an infinite one (identical images, dense FD 0)."""
    return "inf" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


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
    lines += _pruning_lines(report.get("pruning"))
    lines += ["", "## ONNX vs PyTorch drift (onnxruntime CPU)", "",
              "| output | max abs | mean abs | tolerance | ok |", "|---|---|---|---|---|"]
    lines += [f"| {d['name']} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | {d['tolerance']:.3g} | {'yes' if d['ok'] else 'NO'} |"
              for d in report["onnx_drift"]]
    img = report["image_drift"]
    lines += ["", "## Dense vs pruned final images (same seeds and initial noise)", ""]
    if img["skipped"]:
        lines += [f"skipped ({img['reason']}): the gate (PSNR >= {img['min_psnr_db']} dB) was not applied"]
    else:
        lines += [f"PSNR {_fmt(img['psnr_db'])} dB (gate >= {img['min_psnr_db']} dB), max abs {img['max_abs']:.3g}: "
                  f"{'ok' if img['ok'] else 'FAILED'}"]
    if report.get("runtime_drift"):
        lines += ["", "## Torch-free runtime vs PyTorch (same seed, labels and initial noise; `python -m tinyprune.runtime`)",
                  "", "| check | PSNR dB | max abs | gate | ok |", "|---|---|---|---|---|"]
        for d in report["runtime_drift"]:
            if d["skipped"]:
                lines += [f"| {d['name']} | skipped ({d['reason']}) | - | >= {d['min_psnr_db']} dB | - |"]
            else:
                lines += [f"| {d['name']} | {_fmt(d['psnr_db'])} | {d['max_abs']:.3g} | >= {d['min_psnr_db']} dB | "
                          f"{'yes' if d['ok'] else 'NO'} |"]
    lines += _quality_lines(report.get("quality"))
    lines += ["", f"**Result: {'all gates passed' if report['ok'] else 'a gate FAILED'}**", ""]
    (root / "report" / "report.md").write_text("\n".join(lines))


def _quality_lines(q: dict | None) -> list[str]:
    if not q:
        return ["", "## Quality (digit yardstick)", "", "not applied: the pipeline is not a digit pipeline, or --quality 0"]
    return [
        "", f"## Quality (digit yardstick, {q['n_samples']} samples each, same labels and noise)", "",
        "| | FD to held-out real digits | class accuracy |", "|---|---|---|",
        f"| dense | {q['dense']['fd']:.4g} | {q['dense']['accuracy']:.3f} |",
        f"| pruned | {q['pruned']['fd']:.4g} | {q['pruned']['accuracy']:.3f} |", "",
        f"FD ratio {'inf' if q['fd_ratio'] is None else format(q['fd_ratio'], '.3f')} (gate <= {q['max_fd_ratio']}), "
        f"accuracy gate >= {q['min_accuracy']}; "
        f"pruned vs dense PSNR {_fmt(q['psnr_db'])} dB, SSIM {q['ssim']:.3f}: {'ok' if q['ok'] else 'FAILED'}", "",
        "![dense row on top, pruned row below, same seeds](grid.png)",
    ]


def pruning_summary(plan: PrunePlan) -> dict:
    """What the report says about how each component was pruned: 2:4 layers chosen (with the measured
    sensitivity that ranked them), left dense (with the reason), and the l1-grad / recovery record."""
    out = {}
    for comp, p in plan.components.items():
        entry = {}
        if plan.pattern == "2:4":
            def row(name, layer):
                shown = ("sensitivity", "energy_lost", "rank", "reason")
                return {"layer": name, "numel": layer.numel, **{k: v for k, v in layer.to_dict().items() if k in shown}}
            layers = p.layers.items()
            chosen = [row(n, d) for n, d in layers if d.pattern == "2:4"]
            entry["two_four"] = {
                "chosen": sorted(chosen, key=lambda r: r.get("rank", 0)),
                "not_chosen": [row(n, d) for n, d in layers if d.pattern == "none" and d.ranked],
                "ineligible": [row(n, d) for n, d in layers if d.pattern == "none" and not d.ranked],
            }
        if isinstance(p, MaskedComponent) and p.l1_grad is not None:
            entry["l1_grad"] = {k: v for k, v in p.l1_grad.items() if k != "schedule"}
        if p.recovery is not None:
            entry["recovery"] = p.recovery
        if p.scores is not None:
            entry["scores"] = p.scores
        if getattr(p, "target", {}).get("speedup"):
            entry["speedup"] = p.target["speedup"]
        if entry:
            out[comp] = entry
    return out


def _pruning_lines(summary: dict | None) -> list[str]:
    lines = []
    for comp, s in (summary or {}).items():
        if "l1_grad" in s:
            g = s["l1_grad"]
            lines += ["", f"## {comp}: l1-grad", "",
                      f"alpha {g['alpha']}, beta {g['beta']}, L1 {g['l1']}, {g['iterations']} prune steps, "
                      f"{g['recovery_steps']} recovery steps; {g['regrown']} weights regrown; calibration loss "
                      f"dense {g['loss_dense']:.5f} -> pruned {g['loss_pruned']:.5f}"]
        if "recovery" in s:
            r = s["recovery"]
            lines += ["", f"{comp}: recovery {r['steps']} steps (masks fixed), calibration loss "
                          f"{r['loss_before']:.5f} -> {r['loss_after']:.5f}"]
        if "speedup" in s:
            v = s["speedup"]
            asked = f"{v['speedup']:g}x" if v.get("speedup") else f"{v['budget_ms']:g} ms"
            got = (f", measured {v['measured']['speedup']:.2f}x on onnxruntime CPU here (p50 {v['measured']['p50_ms']:.1f}"
                   f" vs {v['measured']['dense_p50_ms']:.1f} ms dense)" if v.get("measured") else ", not measured here")
            lines += ["", f"{comp}: latency target {asked}: predicted {v['predicted_speedup']:.2f}x "
                          f"({v['cost_model']}){got}" + ("" if v.get("met", True) else "; NOT reached")]
        if "two_four" in s:
            t = s["two_four"]
            key = "sensitivity" if any("sensitivity" in r for r in t["chosen"] + t["not_chosen"]) else "energy_lost"
            what = "loss increase when made 2:4 alone" if key == "sensitivity" else "weight energy removed by 2:4"
            lines += ["", f"## {comp}: 2:4 layers, least sensitive first ({what})", "",
                      f"| layer | weights | {key.replace('_', ' ')} | |", "|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['numel']} | {r[key]:.3g} | 2:4 |" for r in t["chosen"]]
            lines += [f"| {r['layer']} | {r['numel']} | {r[key]:.3g} | dense: {r['reason']} |" for r in t["not_chosen"]]
            if t["ineligible"]:
                lines += ["", f"{comp}: {len(t['ineligible'])} layers not eligible for 2:4", "",
                          "| layer | weights | reason |", "|---|---|---|"]
                lines += [f"| {r['layer']} | {r['numel']} | {r['reason']} |" for r in t["ineligible"]]
    return lines
