import pytest
import torch

from tinyprune.prune.bake import apply_masks
from tinyprune.prune.masks import n_of_m, nm_eligible, prunable_weights, sparsity_of, unstructured
from tinyprune.export.metadata import is_n_of_m


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(64, 32, 3, 3, generator=g), "b": torch.rand(40, 24, generator=g), "c": torch.rand(7, 5, generator=g)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.43, 0.5, 0.9])
def test_global_exact_count(sparsity):
    scores = _scores()
    masks = unstructured(scores, sparsity, "global")
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    kept_min = min(s[m].min() for s, m in zip(scores.values(), masks.values()) if m.any())
    dropped_max = max(s[~m].max() for s, m in zip(scores.values(), masks.values()) if (~m).any()) if sparsity else -1
    assert dropped_max <= kept_min  # the lowest scores go, whatever layer they are in


def test_global_ties_still_exact():
    scores = {"a": torch.zeros(10, 10), "b": torch.ones(10, 10)}
    masks = unstructured(scores, 0.25, "global")
    assert int((~masks["a"]).sum()) == 50 and int((~masks["b"]).sum()) == 0


@pytest.mark.parametrize("sample", [1 << 22, 64])
def test_kth_smallest_is_exact_even_when_the_sampled_bracket_misses(monkeypatch, sample):
    """A sample of 64 strided scores from sorted layers brackets the wrong place: the bracket widens until exact."""
    from tinyprune.prune import masks

    monkeypatch.setattr(masks, "_SAMPLE", sample)
    g = torch.Generator().manual_seed(1)
    scores = {"sorted": torch.arange(5000.0) / 5000, "ties": torch.full((300, 10), 0.25),
              "noise": torch.rand(40, 50, generator=g) - 0.5}
    flat = torch.cat([s.flatten() for s in scores.values()])
    for k in (1, 17, 2500, 4321, 6000, len(flat)):
        value, below = masks.kth_smallest(scores, k)
        assert value == flat.kthvalue(k).values and below == int((flat < value).sum())


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_chunked_magnitude_masks_equal_the_materialised_ones(monkeypatch, chunk):
    """importance.magnitude's scores are read chunk by chunk into one buffer: the same masks, ties across chunk
    and layer borders resolved in the same order, as from |w| held whole."""
    from tinyprune.prune import masks
    from tinyprune.prune.importance import SCORES

    monkeypatch.setattr(masks, "_CHUNK", chunk)
    monkeypatch.setattr(masks, "_SAMPLE", 50)
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(9, 4, 3, 3, generator=g), "b": torch.full((6, 5), -0.5), "c": torch.randn(13, generator=g)}
    weights["a"][::2] = 0.5
    lazy = SCORES["magnitude"](weights)
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    for sparsity in (0.2, 0.43, 0.7):
        keep = torch.ones_like(flat, dtype=torch.bool)  # the definition: lowest first, ties in layer and index order
        keep[torch.argsort(flat, stable=True)[:round(sparsity * len(flat))]] = False
        for scores in (lazy, {k: w.abs() for k, w in weights.items()}):
            got = unstructured(scores, sparsity)
            assert torch.equal(torch.cat([got[k].flatten() for k in weights]), keep), sparsity


def test_layer_scope_same_sparsity_per_layer():
    scores = _scores()
    masks = unstructured(scores, 0.43, "layer")
    for name, m in masks.items():
        assert int((~m).sum()) == round(0.43 * m.numel()), name


def test_n_of_m_conv_and_linear():
    conv = torch.randn(16, 8, 3, 3)
    mask = n_of_m(conv.abs())
    assert mask.shape == conv.shape and sparsity_of({"c": mask}) == 0.5
    assert is_n_of_m((conv * mask).numpy(), axis=1)
    # the two largest of each group along input channels survive
    group = conv[0, 0:4, 1, 1].abs()
    assert set(mask[0, 0:4, 1, 1].nonzero().flatten().tolist()) == set(group.topk(2).indices.tolist())
    lin = torch.randn(12, 16)
    m2 = n_of_m(lin.abs())
    assert is_n_of_m((lin * m2).numpy(), axis=1)
    # transposed as an ONNX MatMul initializer, the groups lie along axis 0
    assert is_n_of_m((lin * m2).T.numpy(), axis=0)
    assert not is_n_of_m((lin * m2).numpy(), axis=0)


def test_n_of_m_eligibility():
    assert nm_eligible(torch.zeros(8, 6, 3, 3)) == "6 input channels is not a multiple of 4"
    assert nm_eligible(torch.zeros(8, 8)) is None


def test_bake_zeros_in_place():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Conv2d(4, 4, 1))
    weights = prunable_weights(lin)
    assert set(weights) == {"0.weight", "1.weight"}
    masks = unstructured({k: w.abs() for k, w in weights.items()}, 0.5)
    plan = apply_masks(lin, masks)
    assert plan["0.weight"]["zeros"] + plan["1.weight"]["zeros"] == 24
    assert all(int((w[~masks[k]] != 0).sum()) == 0 for k, w in weights.items())
    assert int((lin[0].weight == 0).sum()) == plan["0.weight"]["zeros"]
