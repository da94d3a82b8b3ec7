"""Export stage: takes a (pruned) Pipeline and a device profile; gives one ONNX file per component.

specs.py builds each component's spec (inputs, outputs, dynamic axes, tolerances) from the model config,
writer.py writes ONNX (external data past 2 GB), metadata.py writes and recomputes the sparsity metadata,
inspection.py reads it back for `tinyprune inspect`.
"""
