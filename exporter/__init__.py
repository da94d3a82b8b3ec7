"""tinyprune: prune diffusers pipelines and export them as deployable ONNX / TensorRT bundles."""

__version__ = "0.1.0"
