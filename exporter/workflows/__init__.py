"""Workflows: what each CLI command calls. They run the stages in order; no stage imports a workflow.

export.py (prune -> bake -> ONNX -> checks -> bundle), validate.py (the checks again on a bundle), sweep.py (one
method at several sparsities with the quality yardstick).
"""
