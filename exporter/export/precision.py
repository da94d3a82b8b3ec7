"""Precision of the exported ONNX files: fp16 conversion and int8 QDQ quantization, applied in place to the fp32
files of a staged bundle, after the runtime files are written (int8 calibrates through the bundle's own runtime).

fp16: every component's weights and compute in fp16 (onnxruntime's converter, inputs and outputs kept fp32 so that
the runtime and diffusers' ONNX pipelines feed them as before). Nodes whose fp32 activations, measured on the
component's drift feed, come within OVERFLOW_MARGIN of fp16's largest finite value stay fp32 (SDXL-class VAE decoders
overflow in fp16); the result names them.

int8: the UNet (the component a generation calls once per step; text encoders and VAE run once and stay float) in
QDQ form: QuantizeLinear/DequantizeLinear pairs around Conv, MatMul and Gemm, weights int8 per output channel,
activation ranges from static MinMax calibration on the UNet's own inputs along the runtime's sampler for the
export's calibration conditions. Layers whose int8 noise the output does not forgive stay float, by measurement: the
UNet's output SQNR against fp32 on calibration feeds is measured with all layers int8 and with each FALLBACK_GROUPS
group (the layers NVIDIA's ModelOpt diffusion recipe keeps out of int8: conv_in, conv_out, time embeddings) put back
in float; a group that gains FALLBACK_MIN_GAIN_DB or more stays float (on the demo, conv_in: +7.6 dB for 0.2 % of the
MACs; every attention or feed-forward layer together gained under 0.2 dB). TensorRT takes QDQ as explicit quantization when both sides are int8 with zero
point 0, so TensorRT targets get symmetric int8 activations and float biases; onnxruntime CPU runs uint8 activations against int8
weights faster on x86 (its u8s8 kernels; measured here 1.33x against 1.10x for s8s8 on an 80M UNet, AVX2), so CPU
targets get those.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyprune.config import PRECISIONS, DeviceProfile
from tinyprune.errors import InputError

FP16_MAX = 65504.0
OVERFLOW_MARGIN = 0.5  # activations past half fp16's range stay fp32: the drift feed is one input, not the worst one
INT8_COMPONENTS = ("unet",)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_CONDITIONS = 8  # the first of the family's calibration conditions, each sampled along 20 DDIM steps
CALIBRATION_FEEDS = 32  # UNet calls the int8 calibration keeps, spread over those steps
# Measured on onnxruntime CPU: int8 QDQ made an 81M-param UNet 1.85x (AVX-512 VNNI) and 1.33x (AVX2) faster, the
# 2.8M demo UNet 0.89x slower (per-operator overhead). auto picks int8 for CPU targets from this size on.
AUTO_INT8_MIN_PARAMS = 20_000_000
# candidate layers for int8's float fallback, by the module path in the node's name (the trace names nodes after
# diffusers' modules); every UNet family has the first two
FALLBACK_GROUPS = {"conv_in": r"/conv_in/", "conv_out": r"/conv_out/",
                   "time embedding": r"/(time_embedding|time_emb_proj|add_embedding|class_embedding)/"}
FALLBACK_MIN_GAIN_DB = 1.0
FALLBACK_EVAL_FEEDS = 8  # of the calibration feeds, spread over the trajectories: the SQNR's sample


@dataclass(frozen=True)
class Converted:
    """One component's file after conversion: its precision, the nodes left in float and why, what it took."""

    component: str
    precision: str
    nodes: int  # nodes converted (fp16) or quantized (int8)
    kept_float: tuple[str, ...] = ()
    why_kept: str = ""
    calibration_feeds: int = 0
    seconds: float = 0.0
    fallback: "Fallback | None" = None  # int8: what the float fallback measured

    def to_dict(self) -> dict:
        d = {"precision": self.precision, "nodes": self.nodes, "kept_float": list(self.kept_float),
             "seconds": round(self.seconds, 2)}
        if self.kept_float:
            d["why_kept"] = self.why_kept
        if self.calibration_feeds:
            d["calibration_feeds"] = self.calibration_feeds
        if self.fallback is not None:
            d["fallback"] = self.fallback.to_dict()
        return d


@dataclass(frozen=True)
class Fallback:
    """int8's float fallback as measured: the output SQNR (dB, against the fp32 file on FALLBACK_EVAL_FEEDS
    calibration feeds) with every layer int8, the gain of each candidate group put back in float, the groups kept
    float and the SQNR of the file as written."""

    all_int8_db: float
    gains_db: dict[str, float]
    kept: tuple[str, ...]
    final_db: float
    min_gain_db: float = FALLBACK_MIN_GAIN_DB

    def to_dict(self) -> dict:
        return {"output_sqnr_db_all_int8": round(self.all_int8_db, 2),
                "gain_db": {k: round(v, 2) for k, v in self.gains_db.items()}, "min_gain_db": self.min_gain_db,
                "kept_float": list(self.kept), "output_sqnr_db": round(self.final_db, 2)}


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    notice: str | None = None


def parse_precision(value: str | None) -> str:
    value = "fp32" if value is None else value
    if value not in (*PRECISIONS, "auto"):
        raise InputError(f"unknown --precision '{value}'; known: {', '.join((*PRECISIONS, 'auto'))}")
    return value


def resolve(requested: str | None, profile: DeviceProfile, unet_params: int) -> PrecisionChoice:
    """The precision an export writes. auto: fp16 on TensorRT targets that list it (NVIDIA's diffusion demo builds
    fp16 engines); int8 on CPU targets that list it when the UNet is big enough to gain (AUTO_INT8_MIN_PARAMS);
    else fp32. An explicit precision the profile does not list is refused."""
    requested = parse_precision(requested)
    if requested == "auto":
        if profile.has_tensorrt and "fp16" in profile.precisions:
            return PrecisionChoice("fp16", f"--precision auto: fp16 ({profile.name} builds TensorRT fp16 engines)")
        if not profile.has_tensorrt and "int8" in profile.precisions and unet_params >= AUTO_INT8_MIN_PARAMS:
            return PrecisionChoice("int8", f"--precision auto: int8 (a {unet_params / 1e6:.0f}M-param UNet on "
                                           f"{profile.name}'s CPU gains from int8 kernels)")
        return PrecisionChoice("fp32", f"--precision auto: fp32 (on {profile.name}, a {unet_params / 1e6:.1f}M-param "
                                       "UNet gains nothing from lower precision)")
    if requested not in profile.precisions:
        raise InputError(f"--precision {requested}: target {profile.name} runs {', '.join(profile.precisions)}")
    return PrecisionChoice(requested)


def component_precision(precision: str, component: str) -> str:
    """The precision a component's file is written in under an export's precision."""
    if precision == "int8":
        return "int8" if component in INT8_COMPONENTS else "fp32"
    return precision


def _reader(feeds: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    return Feeds()


def _fed(path: Path, feeds: list[dict]) -> list[dict]:
    """The feeds cut to the inputs the file at `path` declares (the runtime's feeds carry every component's)."""
    import onnx

    wanted = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    return [{k: v for k, v in f.items() if k in wanted} for f in feeds]


def _ranges(path: Path, feeds: list[dict], workdir: Path) -> dict[str, float]:
    """max |activation| of every float tensor over `feeds` (onnxruntime's MinMax calibrator, the quantizer's own)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    feeds = _fed(path, feeds)
    calibrator = create_calibrator(str(path), op_types_to_calibrate=[], augmented_model_path=str(workdir / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    calibrator.collect_data(_reader(feeds))
    data = calibrator.compute_data()
    return {name: float(max(abs(float(np.min(r.range_value[0]))), abs(float(np.max(r.range_value[1])))))
            for name, r in data.data.items()}


def _rewrite(model, path: Path, precision: str, threshold: int) -> None:
    """Write the converted model (tensors in memory) over `path` and its data file, the rest of its directory
    (config.json) left as it is: metadata recomputed from its own weights, precision stamped."""
    import onnx

    from tinyprune.export.metadata import restamp
    from tinyprune.export.writer import _data_size, _write_model

    restamp(model, precision=precision)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        new = Path(work) / path.name
        _write_model(model, new, _data_size(model, path.parent) > threshold)
        for old in path.parent.glob(path.name + "*"):
            old.unlink()
        for f in Path(work).iterdir():
            f.replace(path.parent / f.name)
    onnx.checker.check_model(str(path))


def to_fp16(path: Path, component: str, feed: dict, threshold: int) -> Converted:
    """The fp32 ONNX file at `path` rewritten in fp16, overflowing nodes kept fp32 (module docstring)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from tinyprune.export.writer import load_onnx

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        ranges = _ranges(path, [feed], Path(work))
        # the converter casts between fp32 and fp16 nodes from the intermediate tensors' types: infer them (from the
        # file, which works past protobuf's 2 GB where inference in memory does not)
        inferred = path.parent / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        try:
            model = load_onnx(inferred)
        finally:
            inferred.unlink()
    limit = FP16_MAX * OVERFLOW_MARGIN
    hot = {name for name, r in ranges.items() if not np.isfinite(r) or r > limit}
    kept = tuple(sorted(n.name for n in model.graph.node if set(n.output) & hot))
    converted = sum(1 for n in model.graph.node if n.name not in kept)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(kept), disable_shape_infer=True)
    OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end of the graph
    _rewrite(model, path, "fp16", threshold)
    return Converted(component, "fp16", converted, kept,
                     f"fp32 activations above {limit:g} (half fp16's largest finite value) on the drift feed" if kept
                     else "", seconds=time.perf_counter() - t0)


def _quantize(path: Path, out: Path, feeds: list[dict], symmetric: bool):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(path), str(out), _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                    use_external_data_format=True,
                    # TensorRT's Q/DQ are int8 only and it folds float biases itself; onnxruntime fuses an
                    # int32 bias into its QLinearConv
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                   "QuantizeBias": not symmetric})


def _in_float(qdq, fp32, nodes: set[str]):
    """The QDQ model with `nodes` back in float: fed their fp32 inputs (activations before their QuantizeLinear,
    weights and biases as the fp32 model's initializers, renamed: a quantized bias's DequantizeLinear output keeps
    the fp32 name), and their outputs' Q/DQ pair gone where no quantized layer reads it. The graph quantize_static
    writes with those nodes excluded, every other layer as quantized."""
    import onnx

    floats = {n.name: n for n in fp32.graph.node if n.name in nodes}
    inits = {i.name: i for i in fp32.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    added = {i.name for i in graph.initializer}  # a float bias TensorRT's QDQ leaves as it was
    for n in graph.node:
        if n.name not in floats:
            continue
        del n.input[:]
        for i in floats[n.name].input:
            if i in inits and i not in added:
                if f"{i}_fp32" not in added:
                    t = onnx.TensorProto()
                    t.CopyFrom(inits[i])
                    t.name = f"{i}_fp32"
                    graph.initializer.append(t)
                    added.add(t.name)
                i = f"{i}_fp32"
            n.input.append(i)
    readers = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    quantized = lambda n: n.op_type in QUANTIZED_OPS and n.name not in nodes
    pairs = set()
    for n in graph.node:
        if n.name not in floats:
            continue
        for k, o in enumerate(n.output):
            qs = readers.get(o, [])
            if not qs or any(q.op_type != "QuantizeLinear" for q in qs):
                continue
            dqs = [d for q in qs for d in readers.get(q.output[0], [])]
            if any(d.op_type != "DequantizeLinear" or any(map(quantized, readers.get(d.output[0], []))) for d in dqs):
                continue
            # the layer writes under the name its readers (or the graph's output) read after the pair
            name = dqs[0].output[0]
            n.output[k] = name
            pairs |= {id(q) for q in qs} | {id(d) for d in dqs}
            for d in dqs[1:]:
                for r in readers.get(d.output[0], []):
                    r.input[:] = [name if i == d.output[0] else i for i in r.input]
    _keep(graph, [n for n in graph.node if id(n) not in pairs])
    _drop_dead(graph)
    return model


def _keep(graph, nodes: list) -> None:
    kept = [type(n)() for n in nodes]
    for k, n in zip(kept, nodes):
        k.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(kept)


def _drop_dead(graph) -> None:
    """Remove the nodes no output depends on any more (the Q/DQ pairs a layer put back in float fed) and the
    initializers nothing reads."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        live = [n for n in graph.node if set(n.output) & used]
        if len(live) == len(graph.node):
            break
        _keep(graph, live)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) < len(graph.initializer):
        copies = [type(t)() for t in keep]
        for c, t in zip(copies, keep):
            c.CopyFrom(t)
        del graph.initializer[:]
        graph.initializer.extend(copies)


def _output_sqnr(reference, models: dict, feeds: list[dict]) -> dict[str, float]:
    """SQNR (dB) of each model's first output against `reference`'s over `feeds`, on onnxruntime CPU."""
    import onnxruntime as ort

    def session(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    ref = session(reference)
    want = [ref.run(None, f)[0].astype(np.float64) for f in feeds]
    signal = sum(float(np.sum(w * w)) for w in want)
    out = {}
    for name, m in models.items():
        s = session(m)
        noise = sum(float(np.sum((w - s.run(None, f)[0]) ** 2)) for w, f in zip(want, feeds))
        out[name] = float(10 * np.log10(signal / max(noise, 1e-30)))
        del s
    return out


def fallback_groups(model) -> dict[str, set[str]]:
    """FALLBACK_GROUPS' quantizable nodes in `model`, the groups with none left out."""
    groups = {g: {n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and re.search(rx, n.name)}
              for g, rx in FALLBACK_GROUPS.items()}
    return {g: v for g, v in groups.items() if v}


def measure_fallback(fp32, qdq, feeds: list[dict]) -> tuple[dict[str, float], float]:
    """Each fallback group's output-SQNR gain when put back in float, and the all-int8 SQNR."""
    groups = fallback_groups(fp32)
    sqnr = _output_sqnr(fp32, {"": qdq, **{g: _in_float(qdq, fp32, v) for g, v in groups.items()}}, feeds)
    base = sqnr.pop("")
    return {g: v - base for g, v in sqnr.items()}, base


def to_int8(path: Path, component: str, feeds: list[dict], symmetric: bool, threshold: int) -> Converted:
    """The fp32 ONNX file at `path` rewritten as int8 QDQ, calibrated on `feeds`, the fallback groups that gain
    enough kept float (module docstring)."""
    import onnx

    t0 = time.perf_counter()
    feeds = _fed(path, feeds)
    sample = [feeds[i] for i in np.unique(np.linspace(0, len(feeds) - 1, FALLBACK_EVAL_FEEDS).round().astype(int))]
    fp32 = onnx.load(str(path))
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        out = Path(work) / "model.onnx"
        _quantize(path, out, feeds, symmetric)
        model = onnx.load(str(out))  # its external data, read before the temporary dir goes
    gains, base = measure_fallback(fp32, model, sample)
    kept = tuple(g for g, v in gains.items() if v >= FALLBACK_MIN_GAIN_DB)
    exclude = sorted(set().union(*(fallback_groups(fp32)[g] for g in kept)))
    final = base
    if kept:  # the same graph quantize_static writes with these nodes excluded, without quantizing again
        model = _in_float(model, fp32, set(exclude))
        final = _output_sqnr(fp32, {"": model}, sample)[""]
    del fp32
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = sum(1 for n in model.graph.node if n.op_type in QUANTIZED_OPS and set(n.input) & dq)
    _rewrite(model, path, "int8", threshold)
    why = (f"{', '.join(kept)} in float gains >= {FALLBACK_MIN_GAIN_DB:g} dB of output SQNR against fp32 "
           f"({base:.1f} dB all int8, {final:.1f} dB as written)" if kept else "")
    return Converted(component, "int8", nodes, tuple(exclude), why, calibration_feeds=len(feeds),
                     seconds=time.perf_counter() - t0, fallback=Fallback(base, gains, kept, final))


class Recorder:
    """A runner that passes feeds through to another and keeps a copy of every feed (the int8 calibration set)."""

    def __init__(self, runner):
        self.runner, self.feeds = runner, []

    def activate(self):
        self.runner.activate()

    def deactivate(self):
        self.runner.deactivate()

    def __call__(self, feed):
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.runner(feed)


def unet_feeds(bundle: Path, conditions: list, steps: int = 20, n: int = CALIBRATION_FEEDS) -> list[dict]:
    """The fp32 UNet's inputs along the bundle runtime's own sampler (DDIM, its default guidance, CFG batches) for
    `conditions`, `n` of them spread evenly over every step of every condition's trajectory."""
    from tinyprune.runtime.generate import Runtime, make_runner

    recorder = Recorder(make_runner(Path(bundle), "unet", "ort-cpu"))
    with Runtime(bundle, "ort-cpu", runners={"unet": recorder}) as rt:
        for i, c in enumerate(conditions):
            rt.denoise([c], seed=i, steps=steps, scheduler="ddim")
    feeds = recorder.feeds
    pick = np.unique(np.linspace(0, len(feeds) - 1, min(n, len(feeds))).round().astype(int))
    return [feeds[i] for i in pick]


def measured_speedup(before: Path, after: Path, feed: dict, iters: int = 10) -> dict:
    """p50 of the fp32 file against the converted one on onnxruntime CPU, calls interleaved, on this machine."""
    from tinyprune.runtime.measure import cpu_name, interleaved, stats_ms
    from tinyprune.runtime.runners import OrtRunner

    with OrtRunner(before) as a, OrtRunner(after) as b:
        times = interleaved({"fp32": lambda: a(feed), "converted": lambda: b(feed)}, warmup=2, iters=iters)
    p50 = {k: stats_ms(v)["p50_ms"] for k, v in times.items()}
    return {"backend": "ort-cpu", "machine": cpu_name(), "calls": iters, "fp32_p50_ms": p50["fp32"],
            "p50_ms": p50["converted"], "speedup": round(p50["fp32"] / p50["converted"], 3)}


@dataclass(frozen=True)
class PrecisionResult:
    """What the precision stage did to a bundle: the files it rewrote, and the UNet's measured speed-up on
    onnxruntime CPU here where the target runs onnxruntime on a CPU (None elsewhere: no GPU to measure on)."""

    precision: str
    converted: dict[str, Converted]
    unet_speedup: dict | None = None

    def to_dict(self) -> dict:
        return {"precision": self.precision, "components": {k: c.to_dict() for k, c in self.converted.items()},
                "unet_measured": self.unet_speedup}


def apply(bundle: Path, precision: str, components: list, profile: DeviceProfile, latent: int, conditions: list,
          threshold: int, log=lambda msg: None) -> PrecisionResult:
    """Rewrite the staged bundle's fp32 component files in `precision`. components: the export's ComponentSpecs
    (their drift feeds are the fp16 overflow probe and the speed-up's feed)."""
    done, speed = {}, None
    if precision == "fp32":
        return PrecisionResult(precision, done)
    if precision == "int8":
        feeds = unet_feeds(bundle, conditions)
        log(f"int8 calibration: {len(feeds)} UNet feeds along the runtime's sampler, {len(conditions)} conditions")
    with tempfile.TemporaryDirectory(dir=bundle) as keep:
        for comp in components:
            if component_precision(precision, comp.name) == "fp32":
                continue
            path = Path(bundle) / comp.name / "model.onnx"
            measure = comp.name == "unet" and not profile.has_tensorrt
            if measure:  # the fp32 file, beside the converted one for the timing
                fp32 = Path(keep) / "unet"
                fp32.mkdir()
                for f in path.parent.glob("model.onnx*"):
                    shutil.copy2(f, fp32 / f.name)
            if precision == "fp16":
                done[comp.name] = to_fp16(path, comp.name, comp.dummy_feed(1, latent, seed=1), threshold)
            else:
                done[comp.name] = to_int8(path, comp.name, feeds, profile.has_tensorrt, threshold)
            c = done[comp.name]
            log(f"{comp.name}: {precision}, {c.nodes} nodes" + (f", {len(c.kept_float)} kept float" if c.kept_float else "")
                + f" ({c.seconds:.1f} s)")
            if measure:
                speed = measured_speedup(fp32 / "model.onnx", path, comp.dummy_feed(profile.batch.opt, latent, seed=2))
                log(f"unet {precision} vs fp32 on onnxruntime CPU here: {speed['speedup']:.2f}x "
                    f"(p50 {speed['p50_ms']:.1f} vs {speed['fp32_p50_ms']:.1f} ms)")
    return PrecisionResult(precision, done, speed)
