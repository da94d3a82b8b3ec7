"""The structure of a diffusers UNet: its prunable groups, the modules that rebuild them narrower, and the record
(unet/structure.json) that lets a pruned UNet be built again from its config.

The prune stage decides which units go (prune/structured/); this module knows what a unit is and how a module
looks without some of them, so the model stage can reload a pruned UNet without the prune stage.

A *group* is one place in the UNet whose inner width can shrink without touching anything outside it;
its *units* are what is kept or removed together:

  resnet       ResnetBlock2D inner channels: conv1 output rows, norm2 channels, time_emb_proj rows (both
               halves for "scale_shift"), conv2 input columns. Unit = one GroupNorm group of norm2.
  attention    diffusers Attention heads: to_q / to_k / to_v rows of the head, to_out[0] columns.
               `heads`, `inner_dim`, `inner_kv_dim` are updated, so every processor still reshapes right
               (they read head_dim as inner_dim // heads). Unit = one head.
  feedforward  FeedForward inner width: both halves of a GEGLU (or SwiGLU) proj, or a GELU proj, and the
               columns of net[2]. Unit = a chunk of inner features (inner // 32 when that divides).

Groups are found by walking the modules (isinstance on diffusers' classes), never by names, and are
recomputed from the modules' current shapes, so a pruned model is described as well as a dense one.

GroupNorm decision: channels go in whole GroupNorm groups. norm2's statistics are per group, so removing
a whole group leaves every other group's mean and variance, and so every kept channel, exactly as before:
the smaller block computes exactly what the dense block computes with those channels' conv2 inputs
masked to zero (tests/test_groups.py checks this equality). Re-choosing num_groups instead would change
the statistics of kept channels (no masked model equals it, so masked scores would not predict it).
`num_groups` becomes the number of kept groups; channels per group stay as trained.

Whole removal: when every unit of a group goes, what is left is a constant or a shortcut, and the group
is replaced by a module that computes just that -- ResnetBypass ((shortcut(x) + conv2.bias) / scale),
RemovedAttention / RemovedFeedForward (their output bias). That removes operators, not only width, which
is what pays on per-operator-bound runtimes (onnxruntime CPU on small UNets, ../shared/DESIGN.md).

Single-token cross-attention: with one context token the softmax is exactly 1, so the output is
to_out(to_v(context)) whatever the queries and keys are. `collapse_single_token_attention` replaces such
an Attention by ValueOnlyAttention (to_v and to_out only): the same output, to_q and to_k gone. Only when
the caller knows the context length is 1 (a class-conditioned pipeline with seq_len 1); the module refuses
a longer context at run time.

Residual-stream channels are NOT pruned, deliberately. In a diffusers UNet a residual channel of one
resolution level is shared by every resnet shortcut, every transformer's proj_in/proj_out, the
down/upsamplers and -- through the skip concatenations -- by the up blocks' norm1 GroupNorms, whose groups
straddle the two concatenated sources. Torch-Pruning's DependencyGraph traces these couplings, but its
issue tracker shows where it breaks on exactly these blocks: GroupNorm importance/shape mismatches
(VainF/Torch-Pruning#268, GN support only since v1.1.3 #93), head bookkeeping that leaves num_heads /
head_dim stale (#287, #340, #411), and DiT/diffusers models failing in pruner.step (#300). Beyond the
tooling, a residual channel also feeds every LayerNorm of the transformer blocks, which normalise over all
channels: removing one changes every other channel's statistics, so the removed model equals no masked
model and masked importance scores do not predict it. And at demo scale thinner layers barely pay on
onnxruntime CPU (../shared/DESIGN.md). So: inner widths and whole operators only, each removal exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

STRUCTURE_FILE = "structure.json"
STRUCTURE_FORMAT = 1
FF_UNITS = 32  # feed-forward inner width is cut in this many chunks when it divides


# --------------------------------------------------------------------------- replacement modules

class ResnetBypass(nn.Module):
    """A ResnetBlock2D whose inner channels are all removed: (shortcut(x) + conv2.bias) / scale."""

    def __init__(self, out_channels: int, conv_shortcut: nn.Module | None, output_scale_factor: float,
                 upsample=None, downsample=None):
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.output_scale_factor = output_scale_factor
        self.upsample, self.downsample = upsample, downsample

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        x = input_tensor
        if self.upsample is not None:
            x = self.upsample(x)
        elif self.downsample is not None:
            x = self.downsample(x)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + self.bias.view(1, -1, 1, 1)) / self.output_scale_factor


class RemovedAttention(nn.Module):
    """An Attention with no head left: its output is to_out's bias (broadcast by the residual add)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.bias.view(1, 1, -1)


class RemovedFeedForward(nn.Module):
    """A FeedForward with no inner unit left: its output is net[2]'s bias."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, hidden_states, *args, **kwargs):
        return self.bias.view(1, 1, -1)


class ValueOnlyAttention(nn.Module):
    """Cross-attention over exactly one context token: softmax over one key is 1, so the output is
    to_out(to_v(context)) for every query position (returned as [B, 1, C], broadcast by the residual add).
    Keeps diffusers' parameter names (to_v, to_out.0) and `heads` so head groups still apply."""

    def __init__(self, to_v: nn.Linear, to_out: nn.ModuleList, heads: int):
        super().__init__()
        self.to_v, self.to_out = to_v, to_out
        self.heads = heads
        self.inner_dim = to_v.out_features

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1:
            raise ValueError("ValueOnlyAttention is exact for a single context token only; this model was pruned "
                             "for a one-token conditioner")
        out = self.to_out[0](self.to_v(encoder_hidden_states))
        return self.to_out[1](out) if len(self.to_out) > 1 else out




# --------------------------------------------------------------------------- groups

@dataclass(frozen=True)
class Group:
    """One prunable place: `units` units of `width` channels each."""

    kind: str  # "resnet" | "attention" | "feedforward"
    path: str  # module path in the UNet
    units: int
    width: int
    params_per_unit: int  # prunable (Conv/Linear weight) elements that go with one unit
    removable: bool = True  # whether the last unit may go too (the group is then replaced)

    @property
    def params(self) -> int:
        return self.units * self.params_per_unit

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """Channel indices of the given unit indices."""
        units = torch.as_tensor(units, dtype=torch.long)
        return (units[:, None] * self.width + torch.arange(self.width)).flatten()


def _resnet_classes():
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D,)


def _attention_ok(m) -> bool:
    return (isinstance(getattr(m, "to_q", None), nn.Linear) and isinstance(getattr(m, "to_k", None), nn.Linear)
            and isinstance(getattr(m, "to_v", None), nn.Linear) and m.to_out is not None
            and isinstance(m.to_out[0], nn.Linear) and getattr(m, "add_k_proj", None) is None
            and m.inner_dim == m.inner_kv_dim == m.to_q.out_features and m.heads > 0
            and m.inner_dim % m.heads == 0)


def _attention_whole_ok(m) -> bool:
    """The constant replacement is exact only where the processor adds nothing around to_out."""
    return (not getattr(m, "residual_connection", False) and getattr(m, "rescale_output_factor", 1.0) == 1.0
            and getattr(m, "group_norm", None) is None and getattr(m, "spatial_norm", None) is None)


def _ff_parts(m):
    """(proj Linear, gated?, out Linear) of a supported FeedForward, else None."""
    if len(m.net) < 3 or not isinstance(m.net[2], nn.Linear):
        return None
    proj = getattr(m.net[0], "proj", None)
    if not isinstance(proj, nn.Linear):
        return None
    inner = m.net[2].in_features
    if proj.out_features == 2 * inner:
        return proj, True, m.net[2]
    if proj.out_features == inner:
        return proj, False, m.net[2]
    return None


def _ff_width(inner: int) -> int:
    return inner // FF_UNITS if inner % FF_UNITS == 0 and inner >= FF_UNITS else 1


def find_groups(unet: nn.Module) -> list[Group]:
    """Every prunable group of the model, in module order."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    resnets = _resnet_classes()
    groups = []
    for path, m in unet.named_modules():
        if isinstance(m, resnets):
            if m.time_embedding_norm not in ("default", "scale_shift") or not isinstance(m.norm2, nn.GroupNorm):
                continue
            c, ng = m.conv1.out_channels, m.norm2.num_groups
            w = c // ng
            per = w * (m.conv1.weight[0].numel() + m.conv2.weight[:, 0].numel())
            if m.time_emb_proj is not None:
                per += w * m.time_emb_proj.in_features * (2 if m.time_embedding_norm == "scale_shift" else 1)
            groups.append(Group("resnet", path, ng, w, per))
        elif isinstance(m, Attention) and _attention_ok(m):
            d = m.inner_dim // m.heads
            per = d * (m.to_q.in_features + m.to_k.in_features + m.to_v.in_features + m.to_out[0].out_features)
            # a cross-attention is the prompt's only way into the UNet: it keeps a head. The loss-based scores do not
            # see what it carries (the denoising loss barely depends on the prompt), and a latency target, which
            # finds attention the costliest per unit of damage, would otherwise take all of them
            groups.append(Group("attention", path, m.heads, d, per,
                                _attention_whole_ok(m) and not getattr(m, "is_cross_attention", False)))
        elif isinstance(m, ValueOnlyAttention):
            d = m.inner_dim // m.heads
            groups.append(Group("attention", path, m.heads, d, d * (m.to_v.in_features + m.to_out[0].out_features)))
        elif isinstance(m, FeedForward) and _ff_parts(m) is not None:
            proj, gated, out = _ff_parts(m)
            inner = out.in_features
            w = _ff_width(inner)
            per = w * (proj.in_features * (2 if gated else 1) + out.out_features)
            groups.append(Group("feedforward", path, inner // w, w, per))
    return groups


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# --------------------------------------------------------------------------- physical removal

def _sliced(old: nn.Linear | nn.Conv2d, rows, cols) -> torch.Tensor:
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    return w if cols is None else w[:, cols]


def _filled(new: nn.Linear | nn.Conv2d, old: nn.Linear | nn.Conv2d, w: torch.Tensor, rows):
    """`new` holding `w` and the kept rows of `old`'s bias, in `old`'s dtype."""
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    return new.to(old.weight.dtype)


def _linear(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = _sliced(old, rows, cols)
    return _filled(nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None), old, w, rows)


def _conv(old: nn.Conv2d, rows=None, cols=None) -> nn.Conv2d:
    w = _sliced(old, rows, cols)
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None)
    return _filled(new, old, w, rows)


def _bias_or_zeros(layer, n: int) -> torch.Tensor:
    return layer.bias.detach().clone() if layer.bias is not None else torch.zeros(n)


def _shrink_resnet(m, g: Group, units: torch.Tensor):
    if len(units) == 0:
        out = m.conv2.out_channels
        bypass = ResnetBypass(out, m.conv_shortcut, m.output_scale_factor,
                              m.upsample if m.up else None, m.downsample if m.down else None)
        bypass.bias.data.copy_(_bias_or_zeros(m.conv2, out))
        return bypass
    idx = g.channels(units)
    c = m.conv1.out_channels
    m.conv1 = _conv(m.conv1, rows=idx)
    norm = nn.GroupNorm(len(units), len(idx), eps=m.norm2.eps, affine=m.norm2.affine)
    if m.norm2.affine:
        norm.weight.data.copy_(m.norm2.weight.detach()[idx])
        norm.bias.data.copy_(m.norm2.bias.detach()[idx])
    m.norm2 = norm
    if m.time_emb_proj is not None:
        rows = torch.cat([idx, idx + c]) if m.time_embedding_norm == "scale_shift" else idx
        m.time_emb_proj = _linear(m.time_emb_proj, rows=rows)
    m.conv2 = _conv(m.conv2, cols=idx)
    return m


def _shrink_attention(m, g: Group, units: torch.Tensor):
    if len(units) == 0:
        out = m.to_out[0].out_features
        removed = RemovedAttention(out)
        removed.bias.data.copy_(_bias_or_zeros(m.to_out[0], out))
        return removed
    idx = g.channels(units)
    if isinstance(m, ValueOnlyAttention):
        m.to_v = _linear(m.to_v, rows=idx)
    else:
        m.to_q, m.to_k, m.to_v = (_linear(lin, rows=idx) for lin in (m.to_q, m.to_k, m.to_v))
        m.inner_kv_dim = len(idx)
        m.sliceable_head_dim = len(units)
    m.to_out[0] = _linear(m.to_out[0], cols=idx)
    m.heads, m.inner_dim = len(units), len(idx)
    return m


def _shrink_ff(m, g: Group, units: torch.Tensor):
    proj, gated, out = _ff_parts(m)
    if len(units) == 0:
        removed = RemovedFeedForward(out.out_features)
        removed.bias.data.copy_(_bias_or_zeros(out, out.out_features))
        return removed
    idx = g.channels(units)
    inner = out.in_features
    m.net[0].proj = _linear(proj, rows=torch.cat([idx, idx + inner]) if gated else idx)
    m.net[2] = _linear(out, cols=idx)
    return m


SHRINK = {"resnet": _shrink_resnet, "attention": _shrink_attention, "feedforward": _shrink_ff}


@torch.no_grad()
# --------------------------------------------------------------------------- structure record and reload

def structure_of(unet: nn.Module) -> dict:
    """The width of every group (0 = replaced), and which cross-attentions are value-only."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    entries = {}
    for path, m in unet.named_modules():
        if isinstance(m, ResnetBypass):
            entries[path] = {"kind": "resnet", "channels": 0, "groups": 0}
        elif isinstance(m, RemovedAttention):
            entries[path] = {"kind": "attention", "heads": 0}
        elif isinstance(m, RemovedFeedForward):
            entries[path] = {"kind": "feedforward", "inner": 0}
        elif isinstance(m, ValueOnlyAttention):
            entries[path] = {"kind": "attention", "heads": m.heads, "value_only": True}
        elif isinstance(m, _resnet_classes()) and isinstance(m.norm2, nn.GroupNorm):
            entries[path] = {"kind": "resnet", "channels": m.conv1.out_channels, "groups": m.norm2.num_groups}
        elif isinstance(m, Attention) and _attention_ok(m):
            entries[path] = {"kind": "attention", "heads": m.heads}
        elif isinstance(m, FeedForward) and _ff_parts(m) is not None:
            entries[path] = {"kind": "feedforward", "inner": _ff_parts(m)[2].in_features}
    return {"format": STRUCTURE_FORMAT, "groups": entries}


def _changed(record: dict, reference: dict) -> dict:
    return {p: e for p, e in record["groups"].items() if reference["groups"].get(p) != e}


def apply_structure(unet: nn.Module, record: dict) -> None:
    """Give a freshly built (dense, from config) UNet the shapes of a structure record; weights are then
    loaded over it. Kept units are taken as the first ones: which ones were kept is in the weights."""
    if record.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"unknown structure format {record.get('format')!r}")
    dense = structure_of(unet)
    for path, e in _changed(record, dense).items():
        if path not in dense["groups"]:
            raise ValueError(f"structure names {path}, which this UNet config does not have")
        if e.get("value_only"):
            m = get_module(unet, path)
            set_module(unet, path, ValueOnlyAttention(m.to_v, m.to_out, m.heads))
        g = next(g for g in find_groups(unet) if g.path == path)
        n = e["inner"] // g.width if e["kind"] == "feedforward" else e.get("groups", e.get("heads"))
        if n == g.units:
            continue
        if e["kind"] == "resnet" and e["channels"] and e["channels"] != n * g.width:
            raise ValueError(f"{path}: {e['channels']} channels in {n} groups does not match {g.width} per group")
        with torch.no_grad():
            set_module(unet, path, SHRINK[g.kind](get_module(unet, path), g, torch.arange(n)))
    unet.tinyprune_structure = structure_of(unet)


def save_structure(unet: nn.Module, unet_dir: Path) -> bool:
    """Write unet/structure.json when the UNet's shapes differ from its config's; True when written."""
    rec = getattr(unet, "tinyprune_structure", None)
    if not rec:
        return False
    (Path(unet_dir) / STRUCTURE_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return True


def load_structured_unet(unet_dir: Path):
    """Build the UNet from its config.json, apply structure.json's shapes, load the safetensors weights
    (strict: every tensor must be there with its exact shape). No pickle anywhere."""
    import diffusers
    from safetensors.torch import load_file

    unet_dir = Path(unet_dir)
    config = json.loads((unet_dir / "config.json").read_text())
    record = json.loads((unet_dir / STRUCTURE_FILE).read_text())
    if config.get("_class_name") not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"config.json names {config.get('_class_name')!r}, not a diffusers UNet")
    # built without storage, the weights then taken as the file maps them (as diffusers loads a dense UNet): a
    # dense UNet made, initialised and shrunk first took 3x SD-1.5's pruned weights at each load
    with torch.device("meta"):
        unet = getattr(diffusers, config["_class_name"]).from_config(config)
        apply_structure(unet, record)
    files = sorted(unet_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{unet_dir}: expected one .safetensors file, found {len(files)}")
    state = load_file(str(files[0]))
    unet.load_state_dict(state, strict=True, assign=True)
    empty = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"{unet_dir}: no weights for {', '.join(empty[:3])}")
    return unet.eval()
