"""`tinyprune inspect`: what an ONNX file really holds, next to what its metadata claims."""

from __future__ import annotations

from pathlib import Path

from tinyprune.export.writer import load_onnx
from tinyprune.export.metadata import check_claims, global_sparsity, read_metadata, tensor_figures


def inspect_file(path: Path) -> dict:
    model = load_onnx(path, load_data=False)  # tensors are read one at a time from the .data file
    base_dir = str(Path(path).parent)
    figures = tensor_figures(model, base_dir)
    return {
        "file": str(path),
        "sparsity": global_sparsity(figures),
        "prunable": sum(f["numel"] for f in figures.values()),
        "tensors_2to4": sum(f["pattern"] == "2:4" for f in figures.values()),
        "tensors": figures,
        "metadata": {k: v for k, v in read_metadata(model).items()},
        "problems": check_claims(model, base_dir) if "tinyprune.sparsity" in read_metadata(model) else [],
    }
