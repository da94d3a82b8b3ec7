"""Importance scores: plain functions (model, batches) -> {parameter name: score tensor}.

A higher score means more important; masks.py keeps the highest-scoring weights.
"""

from tinyprune.prune.importance.magnitude import magnitude

SCORES = {"magnitude": magnitude}
