"""`tinyprune verify`: a bundle against its manifest, its ONNX metadata against the weights, its files against the
target's TensorRT parser."""

from __future__ import annotations

from pathlib import Path

from tinyprune.errors import GateFailed, InputError
from tinyprune.ship.bundle import file_table, read_manifest, sha256_file


def verify(bundle: Path, target: str | None = None) -> dict:
    """Every checksum in the manifest, every ONNX metadata claim, and whether the target's TensorRT parser takes each
    ONNX file (opset and ops: export/trt_parser.py); GateFailed naming what is off.

    target: a profile name, alias or .toml path; None: the profile the manifest names, when this tool knows it (a
    bundle made with a custom profile file is then checked without a target)."""
    from tinyprune.config import load_profile
    from tinyprune.export.trt_parser import unparseable
    from tinyprune.export.writer import load_onnx
    from tinyprune.export.metadata import check_claims, read_metadata

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    profile = load_profile(target) if target is not None else None  # a wrong --target: exit 2 before any work
    if profile is None and isinstance(manifest.get("profile"), str):
        try:
            profile = load_profile(manifest["profile"])
        except InputError:
            profile = None
    problems = []
    for rel, digest in sorted(manifest.get("files", {}).items()):
        path = bundle / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: checksum mismatch")
    extra = sorted(set(file_table(bundle)) - set(manifest.get("files", {})))
    problems += [f"{rel}: not in the manifest" for rel in extra]
    precisions = {}
    for name, comp in sorted(manifest.get("components", {}).items()):
        path = bundle / comp["file"]
        if not path.is_file() or any(p.startswith(comp["file"]) for p in problems):
            continue
        model = load_onnx(path, load_data=False)
        problems += [f"{comp['file']}: {p}" for p in check_claims(model, str(path.parent))]
        precisions[name] = read_metadata(model).get("tinyprune.precision", "fp32")  # check_claims checked it
        if comp.get("precision", precisions[name]) != precisions[name]:
            problems.append(f"{comp['file']}: the manifest says {comp['precision']}, the file {precisions[name]}")
        if profile is not None:
            problems += [str(p) for p in unparseable(model, profile, file=comp["file"])]
    result = {"bundle": str(bundle), "files": len(manifest.get("files", {})), "problems": problems,
              "precision": precisions, "target": profile.name if profile else None,
              "trt_version": profile.trt_version if profile else None, "ok": not problems}
    if problems:
        raise GateFailed(f"verify failed: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), result)
    return result
