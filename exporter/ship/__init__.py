"""Ship stage: takes ONNX files and check results; gives a self-checking bundle.

bundle.py stages and publishes the bundle atomically and verifies its checksums and metadata, report.py writes
report.json/.md, runtime_files.py writes runtime/ (config and a copy of the runtime package), tensorrt.py writes
the trtexec script, builds engines where possible and reads TensorRT build logs.
"""
