"""A TensorRT engine behind the runner lifecycle of runners.py: activate, __call__(feed) -> outputs, deactivate.

Uses the TensorRT 10 name-based tensor API (set_input_shape, set_tensor_address, execute_async_v3). Device buffers
are torch CUDA tensors: torch is already a dependency, its caching allocator makes per-shape reallocation cheap,
and it frees everything when the tensors go, so no cuda-python or pycuda is needed. tensorrt and torch are imported
in activate(), not at module import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BackendMissing, InputError
from .runners import Runner


class TrtRunner(Runner):
    """Runs a serialized engine (build/<component>.engine) on CUDA device `device`, optimization profile 0."""

    def __init__(self, path: str | Path, device: int = 0):
        super().__init__()
        self.path = Path(path)
        self.device = device
        self.name = "trt"

    def _activate(self):
        if not self.path.is_file():
            raise InputError(f"engine {self.path} does not exist; build it with `tinyprune build`")
        try:
            import tensorrt as trt
        except (ImportError, OSError):
            raise BackendMissing("tensorrt is not installed here: pip install 'tinyprune[trt]'") from None
        import torch

        if not torch.cuda.is_available():
            raise BackendMissing("the TensorRT runner needs a CUDA GPU and a CUDA build of torch; none is here")
        self._torch = torch
        self._cuda = torch.device("cuda", self.device)
        torch.cuda.set_device(self._cuda)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise InputError(
                f"TensorRT {trt.__version__} cannot load {self.path}: engines only load with the TensorRT version "
                "and GPU architecture they were built for"
            )
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._cuda)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {}  # name -> torch CUDA tensor, reallocated when the shape changes

    def _deactivate(self):
        # Context before engine before runtime: TensorRT requires that order of destruction.
        for attr in ("_buffers", "_context", "_engine", "_runtime", "_stream"):
            setattr(self, attr, None)
        self._torch.cuda.empty_cache()

    def _buffer(self, name: str, shape: tuple[int, ...]):
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            dtype = self._torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
            buf = self._torch.empty(shape, dtype=dtype, device=self._cuda)
            self._buffers[name] = buf
        return buf

    def _infer(self, feed):
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"{self.path}: feed lacks input(s) {', '.join(missing)}")
        torch = self._torch
        with torch.cuda.stream(self._stream):
            for name in self.input_names:
                host = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
                buf = self._buffer(name, host.shape)
                buf.copy_(torch.from_numpy(host))
                if not self._context.set_input_shape(name, host.shape):
                    raise InputError(f"{self.path}: shape {host.shape} of input {name} is outside the engine's profile")
                self._context.set_tensor_address(name, buf.data_ptr())
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                buf = self._buffer(name, shape)
                self._context.set_tensor_address(name, buf.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path}")
            outputs = {name: self._buffers[name].cpu().numpy() for name in self.output_names}
        self._stream.synchronize()
        return outputs
