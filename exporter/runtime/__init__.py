"""The torch-free runtime: takes a bundle; gives images and timings with numpy + onnxruntime (or TensorRT).

Import-closed (nothing outside this folder, no torch or diffusers), because every bundle carries a copy of the
whole folder: `python -m tinyprune.runtime BUNDLE --prompt "a red bicycle"` runs on a device without tinyprune installed.
"""
