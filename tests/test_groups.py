"""Prunable groups of diffusers blocks: shapes after removal, exact outputs, equality with masking, reload."""

import copy
import json

import pytest
import torch
from torch import nn

from tinyprune.model.structure import (STRUCTURE_FILE, RemovedAttention, RemovedFeedForward, ResnetBypass, ValueOnlyAttention, find_groups, structure_of)

from tinyprune.prune.structured.gates import Gates, masks_from_keep

from tinyprune.prune.structured.groups import prunable_params, unit_sums

from tinyprune.prune.structured.surgery import collapse_single_token_attention, remove_units

torch.set_num_threads(2)


class Holder(nn.Module):
    """One diffusers block as a child, so that its group path is 'block'."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def _resnet(norm="default", up=False, out=48):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    return Holder(ResnetBlock2D(in_channels=32, out_channels=out, temb_channels=64, groups=8,
                                time_embedding_norm=norm, up=up)).eval()


def _attention(cross: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Holder(Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8,
                            bias=True)).eval()


def _ff():
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return Holder(FeedForward(32, mult=4, activation_fn="geglu")).eval()


def _inputs(kind, cross=False):
    g = torch.Generator().manual_seed(1)
    if kind == "resnet":
        return (torch.randn(2, 32, 6, 6, generator=g), torch.randn(2, 64, generator=g)), {}
    if kind == "attention":
        kw = {"encoder_hidden_states": torch.randn(2, 3, 24, generator=g)} if cross else {}
        return (torch.randn(2, 10, 32, generator=g),), kw
    return (torch.randn(2, 10, 32, generator=g),), {}


def _check_removal_equals_masking(model, kind, keep_units, cross=False):
    (args, kw), (g,) = _inputs(kind, cross), find_groups(model)
    keep = {g.path: torch.tensor(keep_units, dtype=torch.long)}
    with torch.no_grad(), Gates(model, [g], masks_from_keep([g], keep)):
        masked = model(*args, **kw)
    small = copy.deepcopy(model)
    remove_units(small, keep, [g])
    with torch.no_grad():
        got = small(*args, **kw)
    assert torch.allclose(got.expand_as(masked) if got.dim() == masked.dim() else got, masked, atol=1e-5), \
        float((got - masked).abs().max())
    return small, g


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_inner_channels_whole_groupnorm_groups(norm):
    model = _resnet(norm)
    (g,) = find_groups(model)
    assert (g.kind, g.units, g.width) == ("resnet", 8, 6)  # norm2: 8 groups of 48 / 8 = 6 channels
    small, g = _check_removal_equals_masking(model, "resnet", [0, 3, 5])
    b = small.block
    assert b.conv1.weight.shape == (18, 32, 3, 3) and b.conv2.weight.shape == (48, 18, 3, 3)
    assert (b.norm2.num_groups, b.norm2.num_channels) == (3, 18)  # channels per group stay 6
    assert b.time_emb_proj.weight.shape == ((36 if norm == "scale_shift" else 18), 64)
    assert prunable_params(model) - prunable_params(small) == 5 * g.params_per_unit


def test_resnet_with_upsampler_and_whole_removal():
    model = _resnet(up=True)
    small, _ = _check_removal_equals_masking(model, "resnet", [])
    assert isinstance(small.block, ResnetBypass)  # shortcut (+ conv2 bias) only


@pytest.mark.parametrize("cross", [False, True])
def test_attention_heads(cross):
    model = _attention(cross)
    (g,) = find_groups(model)
    assert (g.kind, g.units, g.width) == ("attention", 4, 8)
    small, _ = _check_removal_equals_masking(model, "attention", [1, 3], cross)
    a = small.block
    assert (a.heads, a.inner_dim) == (2, 16)
    assert a.to_q.weight.shape == (16, 32) and a.to_k.weight.shape == (16, 24 if cross else 32)
    assert a.to_v.weight.shape == a.to_k.weight.shape and a.to_out[0].weight.shape == (32, 16)


def test_attention_all_heads_removed_is_its_bias():
    model = _attention(False)
    (args, kw) = _inputs("attention")
    small, _ = _check_removal_equals_masking(model, "attention", [])
    assert isinstance(small.block, RemovedAttention)
    assert torch.equal(small.block.bias, model.block.to_out[0].bias)


def test_feedforward_geglu_both_halves():
    model = _ff()
    (g,) = find_groups(model)
    assert (g.kind, g.units, g.width) == ("feedforward", 32, 4)  # inner 128 in 32 chunks
    small, _ = _check_removal_equals_masking(model, "feedforward", list(range(0, 32, 3)))
    f = small.block.net
    assert f[0].proj.weight.shape == (2 * 44, 32) and f[2].weight.shape == (32, 44)
    small, _ = _check_removal_equals_masking(model, "feedforward", [])
    assert isinstance(small.block, RemovedFeedForward)


@pytest.mark.parametrize("kind", ["resnet", "attention", "feedforward"])
def test_nothing_removed_is_bit_exact(kind):
    model = {"resnet": _resnet, "attention": lambda: _attention(True), "feedforward": _ff}[kind]()
    (g,) = find_groups(model)
    args, kw = _inputs(kind, cross=True)
    small = copy.deepcopy(model)
    remove_units(small, {g.path: torch.arange(g.units)}, [g])
    with torch.no_grad():
        assert torch.equal(model(*args, **kw), small(*args, **kw))


def test_unit_sums_cover_every_parameter_of_the_group():
    model = _resnet("scale_shift")
    (g,) = find_groups(model)
    ones = unit_sums(model, g, lambda p: torch.ones_like(p))
    b = model.block
    counted = b.conv1.weight.numel() + b.conv1.bias.numel() + b.norm2.weight.numel() * 2 + \
        b.time_emb_proj.weight.numel() + b.time_emb_proj.bias.numel() + b.conv2.weight.numel()
    assert float(ones.sum()) == counted and torch.all(ones == ones[0])


@pytest.mark.parametrize("axis", [0, 1])
def test_unit_sums_in_slices_are_the_whole_tensor_sums(monkeypatch, axis):
    """Summed a few rows at a time (SUM_SLICE elements), the per-channel float64 sums are the whole tensor's."""
    from tinyprune.prune.structured import groups as G

    x = torch.randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(0))
    whole = x.movedim(axis, 0).reshape(x.shape[axis], -1).double().sum(1)
    monkeypatch.setattr(G, "SUM_SLICE", 20)  # 2 rows of 90 elements a slice: 6 slices
    assert torch.allclose(G._sum_along(x, axis), whole, rtol=1e-12, atol=0)
    assert torch.equal(G._sum_along(x[:, 0, 0, 0], 0), x[:, 0, 0, 0].double())  # a bias: its own elements


# --------------------------------------------------------------------------- whole UNet

def _unet_inputs(unet, tokens=1):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, tokens, unet.config.cross_attention_dim, generator=g))


def _random_keep(groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = {gr.path: torch.randperm(gr.units, generator=g)[: gr.units // 2] for gr in groups}
    keep[groups[0].path] = torch.tensor([], dtype=torch.long)  # one group removed whole
    return keep


def _pruned_tiny():
    from pipelines import tiny as tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    collapse_single_token_attention(pipe.unet)
    groups = find_groups(pipe.unet)
    remove_units(pipe.unet, _random_keep(groups), groups)
    return pipe


def test_unet_removal_equals_masking_and_collapse_is_exact():
    from pipelines import tiny as tiny_pipeline

    unet = tiny_pipeline(seed=0).unet
    x, t, c = _unet_inputs(unet)
    with torch.no_grad():
        dense = unet(x, t, encoder_hidden_states=c).sample
        collapsed = copy.deepcopy(unet)
        paths = collapse_single_token_attention(collapsed)
        assert len(paths) == 4 and all(isinstance(collapsed.get_submodule(p), ValueOnlyAttention) for p in paths)
        assert torch.allclose(collapsed(x, t, encoder_hidden_states=c).sample, dense, atol=1e-5)
        qk = sum(unet.get_submodule(p).to_q.weight.numel() + unet.get_submodule(p).to_k.weight.numel() for p in paths)
        assert prunable_params(unet) - prunable_params(collapsed) == qk == 12288  # to_q, to_k gone
        groups = find_groups(collapsed)
        keep = _random_keep(groups)
        with Gates(collapsed, groups, masks_from_keep(groups, keep)):
            masked = collapsed(x, t, encoder_hidden_states=c).sample
        remove_units(collapsed, keep, groups)
        assert torch.allclose(collapsed(x, t, encoder_hidden_states=c).sample, masked, atol=1e-5)
        with pytest.raises(ValueError, match="single context token"):
            collapsed(x, t, encoder_hidden_states=torch.cat([c, c], 1))


def test_save_load_identical_outputs(tmp_path):
    from tinyprune.model.pipeline import load_pipeline, save_pipeline

    pipe = _pruned_tiny()
    save_pipeline(pipe, tmp_path / "p")
    record = json.loads((tmp_path / "p" / "unet" / STRUCTURE_FILE).read_text())
    assert record == structure_of(pipe.unet)
    assert not list((tmp_path / "p").rglob("*.bin"))  # safetensors only
    back = load_pipeline(tmp_path / "p")
    x, t, c = _unet_inputs(pipe.unet)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, encoder_hidden_states=c).sample,
                           back.unet(x, t, encoder_hidden_states=c).sample)
    assert structure_of(back.unet) == record


def test_diffusers_own_loader_refuses_and_ours_explains(tmp_path):
    from diffusers import UNet2DConditionModel

    from tinyprune.errors import InputError
    from tinyprune.model.pipeline import load_pipeline, save_pipeline

    save_pipeline(_pruned_tiny(), tmp_path / "p")
    with pytest.raises(ValueError, match="expected shape"):  # diffusers: shape mismatch, never silent
        UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet", use_safetensors=True, local_files_only=True)
    (tmp_path / "p" / "unet" / STRUCTURE_FILE).unlink()
    with pytest.raises(InputError, match="structure.json"):
        load_pipeline(tmp_path / "p")
