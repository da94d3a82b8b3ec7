from collections.abc import Mapping

import torch


class LazyScores(Mapping):
    """{name: score} computed on access, one layer at a time: at Stable Diffusion size a materialised
    |w| for every weight would be a second full copy of the UNet (3.4 GB)."""

    def __init__(self, weights: dict[str, torch.Tensor], fn):
        self._weights, self._fn = weights, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._weights[name])

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def magnitude(weights: dict[str, torch.Tensor], batches=None) -> Mapping[str, torch.Tensor]:
    """|w|: needs no data, so batches is ignored. Computed lazily per layer; read each layer's score
    before its mask is baked (prune/run.py does)."""
    return LazyScores(weights, lambda w: w.detach().abs())
