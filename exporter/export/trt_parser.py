"""Which ONNX files a target's TensorRT parses: per TensorRT version, the highest opset its ONNX parser (onnx-tensorrt)
takes and the ops it has no importer for; the opset to export at so that torch emits none of them; and the ops of a
file the target's parser cannot parse.

Plain Python over onnx's protobufs (onnx is imported only to load a file by path): `verify --target` and export's
check run on any machine, without TensorRT.

Sources (checked in the stored copy of github.com/onnx/onnx-tensorrt, one branch per release):
- max opset: docs/operators.md, first line, on release/8.0-GA, 8.2-GA ("TensorRT 8.2 supports operators up to Opset
  13"), 8.4-GA, 8.5-GA, 8.6-GA ("up to Opset 17"), 10.0-GA and 10.1-GA ("inclusive range of opset 9 to opset 20").
- ops: the importers each branch registers (DEFINE_BUILTIN_OP_IMPORTER in builtin_op_importers.cpp, from 10.0 on
  onnxOpImporters.cpp): an op without one goes to the plugin fallback and fails ("No importer registered for op:
  LayerNormalization. Attempting to import as plugin", github.com/ItayElam/SegmentAnything-TensorRT/issues/2 on
  TensorRT 8.5, fixed by 8.6; github.com/NVIDIA/TensorRT/issues/2875). The docs' tables agree (8.5-GA:
  "LayerNormalization | N"); docs/Changelog.md dates the additions: 8.5 GA adds Mod, Trilu, NonZero, GridSample,
  RoiAlign, RandomNormal, MeanVarianceNormalization; 8.6 EA adds GroupNormalization, LayerNormalization, IsInf.
- what torch emits: torch 2.13's TorchScript exporter (torch/onnx/_internal/torchscript_exporter/symbolic_opset<N>.py,
  read in this venv) emits LayerNormalization from opset 17, Gelu from 20 and HardSwish from 14, and below those
  opsets decomposes them into ops every parser here imports (ReduceMean/Sub/Pow/Sqrt/Div; Erf; HardSigmoid + Mul).
  Others it emits whenever the model uses the torch op, at any opset: Trilu (triu/tril, from 14; below: no export),
  GridSample (16), Mod (fmod 10, remainder 11), IsInf (10), NonZero, OneHot, Xor, RandomNormal(Like) (9). It never
  emits GroupNormalization, Mish or CastLike (no symbolic emits them; nn.GroupNorm exports as InstanceNormalization).
  Measured (torch 2.13, diffusers 0.42, transformers 5.24) on tests/pipelines.py's tiny SD at opsets 13, 14, 16, 17,
  18 and 20, and its SDXL, TAESD and LDM pipelines and the demo at 16 and 17: every op they hold is imported by
  TensorRT 8.2, except LayerNormalization (UNet and CLIP text encoders, opset >= 17) and Gelu (UNet feed-forward,
  opset 20). No Trilu: CLIP's eager attention builds its causal mask without triu.
A TensorRT version uses the row of the newest release at or below it (8.5.2 -> 8.5, 10.3 -> 10.0, 9.x -> 8.6): a
parser only gains importers from release to release, so a later point release parses at least what its row says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tinyprune.config import DeviceProfile
from tinyprune.errors import InputError

DEFAULT_DOMAINS = ("", "ai.onnx")

# Ops torch's exporter emits only from this opset on, decomposing them below: exporting under it keeps them out.
TORCH_EMITS_FROM = {"HardSwish": 14, "LayerNormalization": 17, "Gelu": 20}

# No TensorRT parser up to 10.1 imports these (docs/operators.md "N" on release/10.0-GA and 10.1-GA).
NEVER = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix",
    "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})


@dataclass(frozen=True)
class ParserRow:
    """One onnx-tensorrt release: the opsets it takes and the ONNX ops (default domain) it has no importer for,
    beyond NEVER. Each row's `lacks` is the set difference of its importers against release/10.1-GA's."""

    trt: tuple[int, int]
    min_opset: int
    max_opset: int
    lacks: frozenset[str]
    local_functions: bool  # ONNX local functions (FunctionProto), imported from TensorRT 9.0 on

    @property
    def version(self) -> str:
        return ".".join(map(str, self.trt))


_FROM_8_6 = frozenset({"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"})
_FROM_8_5 = _FROM_8_6 | {"GroupNormalization", "IsInf", "LayerNormalization"}
_FROM_8_4 = _FROM_8_5 | {"GridSample", "MeanVarianceNormalization", "Mod", "NonZero", "OneHot", "RandomNormal",
                         "RandomNormalLike", "RoiAlign", "Trilu"}
_FROM_8_2 = _FROM_8_4 | {"HardSwish", "Shrink", "Xor"}
PARSERS = (
    ParserRow((8, 0), 1, 13, _FROM_8_2 | {"Einsum", "GatherND", "IsNaN", "Round", "Scatter", "ScatterElements",
                                          "ScatterND", "Sign"}, False),
    ParserRow((8, 2), 1, 13, _FROM_8_2, False),  # JetPack 4.6.1-4.6.x (jetson-nano)
    ParserRow((8, 4), 1, 17, _FROM_8_4, False),
    ParserRow((8, 5), 1, 17, _FROM_8_5, False),  # JetPack 5.1.x (Xavier): no LayerNormalization
    ParserRow((8, 6), 1, 17, _FROM_8_6, False),  # JetPack 6.0
    ParserRow((10, 0), 9, 20, frozenset({"DeformConv"}), True),  # JetPack 6.1/6.2 (10.3), desktop 10.x
)


def parser_row(trt_version: str) -> ParserRow:
    """The row of the newest onnx-tensorrt release at or below `trt_version` ('8.5.2' -> 8.5)."""
    version = tuple(int(p) for p in re.findall(r"\d+", trt_version))
    rows = [row for row in PARSERS if row.trt <= version]
    if not rows:
        raise InputError(f"TensorRT {trt_version!r} predates this tool's ONNX parser table (TensorRT "
                         f"{PARSERS[0].version} on); set the profile's trt_version to 8.0 or later")
    return rows[-1]


def first_parsed(op: str) -> str | None:
    """The first TensorRT release in the table whose parser imports `op` (None: none does)."""
    return next((row.version for row in PARSERS if op not in row.lacks and op not in NEVER), None)


@dataclass(frozen=True)
class ParserOpset:
    """The opset to export at: `opset`, lowered from `ceiling` (the profile's max_opset and the exporter's) so that
    torch emits none of `avoided`, ops the target's parser lacks."""

    opset: int
    ceiling: int
    avoided: tuple[str, ...] = ()

    @property
    def lowered(self) -> bool:
        return self.opset < self.ceiling


def parser_opset(profile: DeviceProfile, max_opset: int) -> ParserOpset:
    """The highest opset <= min(profile.max_opset, max_opset) at which torch's exporter emits no op the target's
    TensorRT parser lacks but decomposes at lower opsets (TORCH_EMITS_FROM). CPU targets: the ceiling itself."""
    ceiling = min(profile.max_opset, max_opset)
    if not profile.has_tensorrt:
        return ParserOpset(ceiling, ceiling)
    row = parser_row(profile.trt_version)
    opset, avoided = min(ceiling, row.max_opset), []
    for op, since in sorted(TORCH_EMITS_FROM.items(), key=lambda kv: -kv[1]):  # highest first
        if op in row.lacks and since <= opset:
            avoided.append(op)
            opset = since - 1
    return ParserOpset(opset, ceiling, tuple(avoided))


@dataclass(frozen=True)
class ParseProblem:
    """What the target's parser refuses in one file: an op (with its domain and node count), or the file's opset."""

    file: str
    what: str  # op_type, or "opset"
    domain: str = "ai.onnx"
    nodes: int = 0
    reason: str = ""

    def __str__(self) -> str:
        if self.what == "opset":
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {self.what} ({self.domain}, {self.nodes} node{'s' * (self.nodes != 1)}) {self.reason}"


def _nodes(model):
    """(domain, op_type) of every node: the main graph, its subgraphs (If/Loop/Scan bodies), and local functions."""
    stack = [model.graph.node] + [f.node for f in model.functions]
    while stack:
        for node in stack.pop():
            yield node.domain or "", node.op_type
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g.node)
                stack.extend(g.node for g in attr.graphs)


def unparseable(model, profile: DeviceProfile, file: str = "") -> tuple[ParseProblem, ...]:
    """What the target cannot load from `model` (a ModelProto or a path): an opset above the profile's max_opset
    (or outside what its TensorRT parser takes), then, for TensorRT targets, each op its parser has no importer for,
    in name order. An empty tuple: the target's parser takes the file (as far as opsets and op types decide)."""
    if isinstance(model, (str, Path)):
        import onnx

        file = file or str(model)
        model = onnx.load(str(model), load_external_data=False)
    row = parser_row(profile.trt_version) if profile.has_tensorrt else None
    low, high = (row.min_opset, min(profile.max_opset, row.max_opset)) if row else (1, profile.max_opset)
    target = f"TensorRT {profile.trt_version} ({profile.name})" if row else profile.name
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is not None and not low <= opset <= high:
        problems.append(ParseProblem(file, "opset", reason=f"opset {opset} is outside what {target} parses "
                                                            f"(opset {low} to {high})"))
    if row is None:
        return tuple(problems)
    functions = {(f.domain or "", f.name) for f in model.functions}
    counts: dict[tuple[str, str], int] = {}
    for key in _nodes(model):
        counts[key] = counts.get(key, 0) + 1
    for (domain, op), n in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if (domain, op) in functions:
            if not row.local_functions:
                problems.append(ParseProblem(file, op, domain or "local function", n,
                                             f"is an ONNX local function, which {target} cannot import (9.0 on can)"))
        elif domain not in DEFAULT_DOMAINS:
            problems.append(ParseProblem(file, op, domain, n, f"is not an ONNX op; {target} would need a plugin"))
        elif op in row.lacks or op in NEVER:
            since = first_parsed(op)
            problems.append(ParseProblem(file, op, "ai.onnx", n, f"cannot be parsed by {target}" + (
                f": its parser imports it from TensorRT {since} on" if since else ": no TensorRT parser imports it")))
    return tuple(problems)
