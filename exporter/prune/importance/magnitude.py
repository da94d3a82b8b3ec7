from collections.abc import Mapping

import torch


class LazyScores(Mapping):
    """{name: score} computed on access, one layer at a time: at Stable Diffusion size a materialised
    |w| for every weight would be a second full copy of the UNet (3.4 GB)."""

    def __init__(self, weights: dict[str, torch.Tensor], fn):
        self._weights, self._fn = weights, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._weights[name].detach())

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def shape(self, name: str) -> torch.Size:
        return self._weights[name].shape

    def chunks(self, name: str, size: int):
        """The flattened score of one layer, `size` values at a time, each written over the last one (fn is
        elementwise and takes out=): no allocation per chunk (masks._chunks says why that matters)."""
        buffer = torch.empty(size)
        for c in self._weights[name].detach().reshape(-1).split(size):
            yield self._fn(c, out=buffer[:len(c)])


def magnitude(weights: dict[str, torch.Tensor], batches=None) -> Mapping[str, torch.Tensor]:
    """|w|: needs no data, so batches is ignored. Computed lazily per layer; read each layer's score
    before its mask is baked (prune/run.py does)."""
    return LazyScores(weights, torch.abs)
