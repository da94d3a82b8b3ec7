"""The PyTorch side of every drift check: a torch module behind the runtime's Runner lifecycle."""

from __future__ import annotations

import numpy as np

from tinyprune.runtime.runners import Runner


class TorchRunner(Runner):
    """Wraps a torch module whose forward takes the ONNX input names as keyword arguments."""

    def __init__(self, module, input_names: tuple[str, ...], output_names: tuple[str, ...], device: str = "cpu"):
        super().__init__()
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.device = device
        self.name = f"torch[{device}]"

    def _activate(self):
        self.module.to(self.device).eval()

    def _infer(self, feed):
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in self.input_names]
            outs = self.module(*args)
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs)}
