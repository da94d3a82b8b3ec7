"""Runners with one lifecycle: activate() once, __call__(feed) -> outputs any number of times, deactivate().

A runner is also a context manager. Feeds and outputs are dicts of numpy arrays keyed by the ONNX
input/output names, so runners of different backends are interchangeable in validate and bench.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Runner:
    name = "runner"

    def __init__(self):
        self.active = False

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{self.name} runner used before activate()")
        return self._infer(feed)

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def _infer(self, feed):
        raise NotImplementedError


class OrtRunner(Runner):
    """onnxruntime InferenceSession; CPU by default, CUDA when asked and available."""

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int = 0):
        super().__init__()
        self.path = str(path)
        self.providers = providers
        self.threads = threads
        self.name = f"ort[{providers[0].replace('ExecutionProvider', '').lower()}]"
        self.session = None

    def _activate(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=list(self.providers))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _deactivate(self):
        self.session = None

    def _infer(self, feed):
        wanted = {i.name for i in self.session.get_inputs()}
        outs = self.session.run(self.output_names, {k: v for k, v in feed.items() if k in wanted})
        return dict(zip(self.output_names, outs))
