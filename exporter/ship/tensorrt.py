"""TensorRT engines for a bundle: the trtexec script for the device, the Python-API build where TensorRT and the
target's GPU are on this machine, and the sparse-layer report read from the builder's verbose log.

`import tensorrt` happens only inside the functions that build; everything else (the script, the log parser, the
2:4 matching) is plain Python and runs on any machine.

Engines are tied to the GPU architecture and the TensorRT version: a Jetson's engines are built on that Jetson,
from build/build_engines.sh, and the logs it leaves can be copied back into the bundle's build/ for `build` to read.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from tinyprune.ship.bundle import read_manifest, write_manifest
from tinyprune.config import DeviceProfile, load_profile
from tinyprune.errors import BackendMissing, InputError, TinypruneError

SCRIPT = "build/build_engines.sh"
README = "build/README.md"
TIMING_CACHE = "build/timing.cache"
# JetPack installs trtexec here without putting it on PATH.
JETPACK_TRTEXEC_DIR = "/usr/src/tensorrt/bin"
NOTICE = "engines must be built on the device: run build/build_engines.sh there"
# Jetson SoC (from /proc/device-tree/compatible) -> GPU compute capability: Nano, Xavier, Orin.
TEGRA_CC = {"tegra210": "5.3", "tegra194": "7.2", "tegra234": "8.7"}
# All components go to DLA core 0 when DLA is asked for; one core keeps the engines interchangeable between
# processes, and the second core is left for the application's other networks.
DLA_CORE = 0


def trt_version_tuple(version: str) -> tuple[int, ...]:
    """'8.2.1' -> (8, 2, 1), '10.3' -> (10, 3); comparable against (8, 4) and friends."""
    return tuple(int(p) for p in re.findall(r"\d+", version))


def shape_spec(inputs: dict[str, dict[str, list[int]]], which: str) -> str:
    """trtexec's shape list for min/opt/max: 'sample:1x4x8x8,timestep:1'."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in inputs.items())


def _check_target(profile: DeviceProfile, dla: bool) -> None:
    if not profile.has_tensorrt:
        raise InputError(
            f"target {profile.name} has no TensorRT; its bundle runs on onnxruntime: "
            "use `tinyprune bench --backend ort-cpu` or pick a GPU target"
        )
    if dla and profile.dla_cores == 0:
        raise InputError(f"target {profile.name} has no DLA cores; build without --dla")
    if dla and "fp16" not in profile.precisions:
        raise InputError(f"DLA runs fp16 or int8 only and target {profile.name} lists no fp16")


def trtexec_command(component: str, comp: dict, profile: DeviceProfile, dla: bool = False) -> list[str]:
    """The trtexec argv for one component, paths relative to the bundle root.

    Flags follow the target's TensorRT version: --memPoolSize from 8.4 on (--workspace before), layer info
    export from 8.4, --skipInference from 8.6 (--buildOnly before), no precision flags from 11 (strongly typed
    networks only: precision comes from the ONNX types). --int8 only for an int8 QDQ file (explicit quantization:
    the scales are in its QuantizeLinear/DequantizeLinear nodes); on an fp32 file trtexec's --int8 without --calib
    uses placeholder ranges that give wrong images.
    """
    _check_target(profile, dla)
    version = trt_version_tuple(profile.trt_version)
    inputs = comp["inputs"]
    argv = ["trtexec", f"--onnx={comp['file']}", f"--saveEngine=build/{component}.engine"]
    if dla or ("fp16" in profile.precisions and version < (11,)):
        argv.append("--fp16")
    if comp.get("precision") == "int8" and version < (11,):
        argv.append("--int8")
    if profile.sparse_tensor_cores and comp["tensors_2to4"]:
        argv.append("--sparsity=enable")
    if dla:  # DLA needs static shapes: build the opt shape only
        argv += [f"--{k}Shapes={shape_spec(inputs, 'opt')}" for k in ("min", "opt", "max")]
    else:
        argv += [f"--{k}Shapes={shape_spec(inputs, k)}" for k in ("min", "opt", "max")]
    if profile.workspace_mb:  # values are MiB in both syntaxes
        argv.append(f"--memPoolSize=workspace:{profile.workspace_mb}" if version >= (8, 4)
                    else f"--workspace={profile.workspace_mb}")
    if dla:
        argv += [f"--useDLACore={DLA_CORE}", "--allowGPUFallback"]
    argv.append(f"--timingCacheFile={TIMING_CACHE}")
    if version >= (8, 4):
        argv += ["--profilingVerbosity=detailed", f"--exportLayerInfo=build/{component}.layers.json"]
    argv.append("--skipInference" if version >= (8, 6) else "--buildOnly")
    argv.append("--verbose")
    return argv


_SCRIPT_BODY = """\
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:{trtexec_dir}"
if ! command -v trtexec >/dev/null 2>&1; then
  echo "error: trtexec is neither on PATH nor in {trtexec_dir}; install TensorRT {version} (it comes with JetPack)" >&2
  exit 3
fi
mkdir -p build

# build_component NAME TRTEXEC_ARGV...: the verbose log goes to build/NAME.build.log; TensorRT prints the
# "(Sparsity)" lines (eligible layers, layers that got sparse kernels) only when --sparsity is on.
build_component() {{
  local name="$1"; shift
  local log="build/${{name}}.build.log"
  echo "building ${{name}} -> build/${{name}}.engine (log: ${{log}})"
  if ! "$@" > "${{log}}" 2>&1; then
    echo "error: building ${{name}} failed; the end of ${{log}}:" >&2
    tail -n 20 "${{log}}" >&2
    exit 1
  fi
  grep -F "(Sparsity)" "${{log}}" || true
}}
"""


def _target_line(profile: DeviceProfile) -> str:
    jetpack = f" (JetPack {profile.jetpack})" if profile.is_jetson else ""
    return f"TensorRT {profile.trt_version}{jetpack}, GPU compute capability {profile.compute_capability}"


def write_build_script(bundle_dir: Path, manifest: dict, profile: DeviceProfile, dla: bool = False) -> Path:
    """Write build/build_engines.sh and build/README.md for the target; same inputs give the same bytes.

    `manifest` needs only its "components" (file, tensors_2to4, inputs per component): export writes the script
    from them before the manifest itself, so that the script is among the files the manifest checksums."""
    bundle_dir = Path(bundle_dir)
    _check_target(profile, dla)
    components = manifest["components"]
    for name, comp in components.items():
        if not (bundle_dir / comp["file"]).is_file():
            raise InputError(f"bundle {bundle_dir} lacks {comp['file']}, which manifest.json names for {name}")
    lines = [
        "#!/usr/bin/env bash",
        "# TensorRT engines for this tinyprune bundle. Written by `tinyprune export` (GPU targets) and `tinyprune build`",
        "# (the same bytes from the same manifest and target); rerun `tinyprune build` to refresh it.",
        f"# target: {profile.name}: {profile.description}",
        f"# flags written for {_target_line(profile)}",
        "# Engines are tied to the GPU architecture and the TensorRT version: build them on the device that runs",
        "# them, with the TensorRT it runs, and rebuild after a JetPack or TensorRT upgrade.",
    ]
    if not profile.sparse_tensor_cores:
        lines.append(f"# {profile.name} has no sparse tensor cores: zeros give no speed-up there, so no --sparsity.")
    if dla:
        lines.append(f"# DLA core {DLA_CORE} with GPU fallback, static shapes (the opt shapes of the profile).")
    lines.append(_SCRIPT_BODY.format(trtexec_dir=JETPACK_TRTEXEC_DIR, version=profile.trt_version))
    for name, comp in components.items():
        lines.append(f"build_component {shlex.quote(name)} {shlex.join(trtexec_command(name, comp, profile, dla))}")
    lines.append('echo "engines are in build/"')
    script = bundle_dir / SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    (bundle_dir / README).write_text(_readme(components, profile, dla))
    return script


def _readme(components: dict, profile: DeviceProfile, dla: bool) -> str:
    sparse = [n for n, c in components.items() if profile.sparse_tensor_cores and c["tensors_2to4"]]
    outputs = "`build/<component>.engine` and the verbose trtexec log `build/<component>.build.log`"
    if trt_version_tuple(profile.trt_version) >= (8, 4):
        outputs += ", plus the layer table `build/<component>.layers.json`"
    text = [
        f"# Building the TensorRT engines on the {profile.name}",
        "",
        f"Target: {profile.description}; {_target_line(profile)}.",
        "Engines are tied to the GPU architecture and the TensorRT version, so they are built on the device itself.",
        "",
        "1. Copy the whole bundle to the device; the script reads the ONNX files relative to the bundle root:",
        "   `rsync -a BUNDLE/ DEVICE:BUNDLE/`",
        f"2. On the device: `bash BUNDLE/{SCRIPT}` (it finds trtexec on PATH or in `{JETPACK_TRTEXEC_DIR}`).",
        f"3. It writes, per component, {outputs}.",
        f"   `{TIMING_CACHE}` keeps kernel timings, so a rebuild on the same device is faster.",
    ]
    if dla:
        text.append(f"   All components run on DLA core {DLA_CORE}; layers DLA cannot run fall back to the GPU.")
    text += ["", "## Did TensorRT run the 2:4 weights on sparse tensor cores?", ""]
    if sparse:
        text += [
            f"Sparsity is enabled for: {', '.join(sparse)}. After the build:",
            "",
            f"    grep -F \"(Sparsity)\" build/{sparse[0]}.build.log",
            "",
            "prints the layers eligible for sparse math and the layers TensorRT picked a sparse kernel for. An",
            "eligible layer that was not picked ran dense because the dense kernel was faster, which is common for",
            "small channel counts. To name the 2:4 tensors that ran dense, copy `build/*.build.log` back into the",
            "bundle's build/ and run `tinyprune build BUNDLE` there.",
        ]
    elif not profile.sparse_tensor_cores:
        text.append(f"No: the {profile.name} has no sparse tensor cores, so the script does not enable sparsity. "
                    "Only structured pruning (fewer channels) is faster there.")
    else:
        text.append("No component holds 2:4 tensors, so the script does not enable sparsity.")
    return "\n".join(text) + "\n"


# ---- the builder's log -------------------------------------------------------------------------------------

_ELIGIBLE = "(Sparsity) Layers eligible for sparse math:"
_PICKED = "(Sparsity) TRT inference plan picked sparse implementation for layers:"
# A log record starts with a bracketed tag ("[03/14/2023-10:11:12]", "[I]", "[TRT]", "[TensorRT] INFO:"), a glog
# header ("I0829 03:48:41.018076 1161 logging.cc:46]"), or trtexec's "&&&&" banner. A line that starts none of
# these right after a (Sparsity) record is that record's list wrapped by a terminal (copied logs) and is joined on.
_RECORD = re.compile(r"\s*(\[[^\]]*\]|[VIWEF]\d{4} \d\d:\d\d:\d\d|&&&&)")


def _log_line(letter: str, msg: str) -> str:
    """One record the way TensorRT's own Python logger prints it, without the timestamp: '[TRT] [I] msg'."""
    return f"[TRT] [{letter}] {msg}\n"


@dataclass(frozen=True)
class SparseLayerReport:
    eligible: tuple[str, ...]
    picked: tuple[str, ...]
    reported: bool = False  # False: the log holds no (Sparsity) lines (sparsity off, or not the builder's log)

    def not_picked(self) -> tuple[str, ...]:
        """Layers with sparse-eligible weights that TensorRT ran dense because the dense kernel was faster."""
        picked = set(self.picked)
        return tuple(layer for layer in self.eligible if layer not in picked)

    def to_dict(self) -> dict:
        return {"eligible": list(self.eligible), "picked": list(self.picked), "not_picked": list(self.not_picked())}


def _layer_list(text: str) -> tuple[str, ...]:
    # Fused layers read "Conv_3 + Relu_4"; a terminal wrap may have eaten the space at either side of the '+'.
    return tuple(re.sub(r"\s*\+\s*", " + ", item.strip()) for item in text.split(",") if item.strip())


def parse_build_log(text: str) -> SparseLayerReport:
    """The two (Sparsity) lists from a TensorRT verbose build log (trtexec, Python API, or copied from a terminal).

    A log that holds several builds reports the last one.
    """
    lines = text.splitlines()
    found: dict[str, tuple[str, ...]] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        for key, marker in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            at = line.find(marker)
            if at < 0:
                continue
            body = line[at + len(marker):].rstrip()
            # Only a prefixed record can be told apart from its wrapped continuation lines.
            if _RECORD.match(line):
                while i < len(lines) and lines[i].strip() and not _RECORD.match(lines[i]) \
                        and "(Sparsity)" not in lines[i]:
                    body += lines[i].rstrip()
                    i += 1
            found[key] = _layer_list(body)
    return SparseLayerReport(found.get("eligible", ()), found.get("picked", ()), bool(found))


# ---- matching TensorRT layers to the bundle's 2:4 initializers ---------------------------------------------


def _module_path(name: str) -> str:
    """A layer or ONNX node name as a torch module path: '/down_blocks.0/resnets.0/conv1/Conv' ->
    'down_blocks.0.resnets.0.conv1' (the TorchScript exporter names nodes /<module path>/<op>)."""
    parts = [p for p in name.strip().split("/") if p]
    if len(parts) > 1 and name.strip().startswith("/"):
        parts = parts[:-1]
    return ".".join(parts)


def _layer_keys(layer: str) -> set[str]:
    """Module paths a TensorRT layer covers: every part of a fusion 'A + B', both ends of a Myelin
    '{ForeignNode[first...last]}' region (its inner layers are not named in the log)."""
    text = layer.strip()
    foreign = re.fullmatch(r"\{ForeignNode\[(.*)\]\}", text)
    if foreign:
        text = foreign.group(1).replace("...", " + ")
    return {_module_path(part) for part in text.split(" + ") if part.strip()}


def _tensor_key(initializer: str) -> str:
    """'down_blocks.0.resnets.0.conv1.weight' -> 'down_blocks.0.resnets.0.conv1' (torch parameter name)."""
    return initializer[: -len(".weight")] if initializer.endswith(".weight") else initializer


def _unmatched(layers: tuple[str, ...], tensors: list[str], consumers: dict[str, list[str]] | None) -> list[str]:
    covered = set().union(*(_layer_keys(layer) for layer in layers))
    consumers = consumers or {}
    return [t for t in tensors
            if not ({_tensor_key(t)} | {_module_path(node) for node in consumers.get(t, ())}) & covered]


def unpicked_2to4_tensors(report: SparseLayerReport, tensors_2to4: list[str],
                          consumers: dict[str, list[str]] | None = None) -> list[str]:
    """The 2:4 initializers whose consuming layer TensorRT did not run sparse.

    TensorRT names layers after ONNX nodes ('/down_blocks.0/resnets.0/conv1/Conv', fused: 'A + B'); the bundle
    names tensors after torch parameters ('down_blocks.0.resnets.0.conv1.weight'). Both are reduced to the module
    path ('down_blocks.0.resnets.0.conv1') and compared. Parameters the exporter renamed ('onnx::MatMul_123', the
    transposed copy of a Linear weight) carry no module path; `consumers` (initializer -> ONNX node names, from
    weight_consumers()) supplies the node that reads them. A tensor counts as picked when any of its keys is a part
    of a picked layer.
    """
    return _unmatched(report.picked, tensors_2to4, consumers)


def weight_consumers(onnx_path: Path) -> dict[str, list[str]]:
    """Initializer name -> names of the nodes that read it, from the graph alone (external data is not loaded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = {init.name for init in graph.initializer}
    table: dict[str, list[str]] = {}
    for node in graph.node:
        for inp in node.input:
            if inp in names:
                table.setdefault(inp, []).append(node.name)
    return table


def sparse_summary(bundle_dir: Path, name: str, comp: dict) -> dict | None:
    """The sparse-layer figures for one component from build/<name>.build.log, or None when there is no log.

    unpicked_2to4 splits into ineligible_2to4 (TensorRT would not consider a sparse kernel, e.g. a MatMul it does
    not support sparse) and the rest, eligible but run dense because the dense kernel was faster. Both stay empty
    when the log holds no (Sparsity) lines: then TensorRT said nothing, and nothing is claimed.
    """
    log_path = Path(bundle_dir) / "build" / f"{name}.build.log"
    if not log_path.is_file():
        return None
    report = parse_build_log(log_path.read_text(errors="replace"))
    unpicked, ineligible = [], []
    if report.reported and comp["tensors_2to4"]:
        consumers = weight_consumers(Path(bundle_dir) / comp["file"])
        unpicked = unpicked_2to4_tensors(report, comp["tensors_2to4"], consumers)
        ineligible = _unmatched(report.eligible, unpicked, consumers)
    return dict(report.to_dict(), reported=report.reported, unpicked_2to4=unpicked, ineligible_2to4=ineligible)


# ---- building here ----------------------------------------------------------------------------------------


def _make_logger(trt):
    letters = {trt.ILogger.Severity.INTERNAL_ERROR: "F", trt.ILogger.Severity.ERROR: "E",
               trt.ILogger.Severity.WARNING: "W", trt.ILogger.Severity.INFO: "I", trt.ILogger.Severity.VERBOSE: "V"}

    class FileLogger(trt.ILogger):
        """Every TensorRT message, verbose included, to `file`, which is switched per component.

        One logger and one builder serve all components: TensorRT keeps the first logger it was given for the
        process while a builder or runtime made with it lives, so a logger per component would go unheard.
        """

        def __init__(self):
            trt.ILogger.__init__(self)
            self.file = None
            self.last = ""

        def log(self, severity, msg):
            self.last = msg
            if self.file is not None:
                self.file.write(_log_line(letters.get(severity, "I"), msg))

    return FileLogger()


def _config(trt, builder, comp: dict, profile: DeviceProfile, dla: bool, cache_path: Path):
    config = builder.create_builder_config()
    # TensorRT 11 removed the FP16 flag (and platform_has_fast_fp16): precision then comes from the ONNX types.
    if hasattr(trt.BuilderFlag, "FP16") and "fp16" in profile.precisions and (dla or builder.platform_has_fast_fp16):
        config.set_flag(trt.BuilderFlag.FP16)
    if comp.get("precision") == "int8" and version < (11,):
        argv.append("--int8")
    if profile.sparse_tensor_cores and comp["tensors_2to4"]:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if profile.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mb << 20)
    shapes = builder.create_optimization_profile()
    for name, dims in comp["inputs"].items():
        if dla:  # DLA needs static shapes
            shapes.set_shape(name, dims["opt"], dims["opt"], dims["opt"])
        else:
            shapes.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(shapes)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU or TensorRT
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    if dla:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = DLA_CORE
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def build_engines(bundle_dir: Path, manifest: dict, profile: DeviceProfile, dla: bool = False, log=print) -> dict:
    """One engine per component through the TensorRT Python API, on this machine's GPU.

    Returns {component: {"engine", "log", "seconds", "sparse": {"eligible", "picked", "not_picked",
    "unpicked_2to4"}}}. BackendMissing when TensorRT cannot use a CUDA GPU here.
    """
    import tensorrt as trt

    _check_target(profile, dla)
    bundle_dir = Path(bundle_dir)
    (bundle_dir / "build").mkdir(exist_ok=True)
    cache_path = bundle_dir / TIMING_CACHE
    version = trt_version_tuple(trt.__version__)
    logger = _make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # the bindings raise this when the builder comes back null: CUDA did not initialise
        raise BackendMissing(f"TensorRT {trt.__version__} cannot use a CUDA GPU here ({logger.last or 'no detail'})") \
            from None
    runtime = trt.Runtime(logger)
    results = {}
    for name, comp in manifest["components"].items():
        log_rel, engine_rel = f"build/{name}.build.log", f"build/{name}.engine"
        log(f"building {name} -> {engine_rel} (TensorRT {trt.__version__}, log: {log_rel})")
        t0 = time.perf_counter()
        with open(bundle_dir / log_rel, "w") as fh:
            logger.file = fh
            try:
                # Explicit batch is the only mode from TensorRT 10 on, where the flag is deprecated.
                flags = 0 if version >= (10,) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
                network = builder.create_network(flags)
                parser = trt.OnnxParser(network, logger)
                # parse_from_file, not parse(bytes): it resolves external data (model.onnx_data) beside the file.
                if not parser.parse_from_file(str(bundle_dir / comp["file"])):
                    errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                    raise InputError(f"TensorRT {trt.__version__} cannot parse {comp['file']}: {errors}")
                config = _config(trt, builder, comp, profile, dla, cache_path)
                plan = builder.build_serialized_network(network, config)
                if plan is None:
                    raise TinypruneError(f"TensorRT could not build {name} ({logger.last}); see {log_rel}")
                (bundle_dir / engine_rel).write_bytes(plan)
                cache_path.write_bytes(config.get_timing_cache().serialize())
                engine = runtime.deserialize_cuda_engine(plan)
                layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
                (bundle_dir / "build" / f"{name}.layers.json").write_text(layers)
            finally:
                logger.file = None
        seconds = round(time.perf_counter() - t0, 2)
        sparse = sparse_summary(bundle_dir, name, comp)
        unpicked = sparse["unpicked_2to4"]
        if unpicked:
            more = f" (+{len(unpicked) - 5} more)" if len(unpicked) > 5 else ""
            log(f"warning: {name}: {len(unpicked)} 2:4 tensors ran dense ({len(sparse['ineligible_2to4'])} not "
                f"eligible for sparse math, the rest slower sparse): {', '.join(unpicked[:5])}{more}")
        counts = (f": {len(sparse['picked'])} of {len(sparse['eligible'])} sparse-eligible layers run sparse"
                  if profile.sparse_tensor_cores and comp["tensors_2to4"] else "")
        log(f"{name} built in {seconds:.1f} s{counts}")
        results[name] = {"engine": engine_rel, "log": log_rel, "seconds": seconds, "sparse": sparse}
    return results


def _jetson_cc() -> str | None:
    """This machine's GPU compute capability if it is a Jetson, else None."""
    if not Path("/etc/nv_tegra_release").is_file():
        return None
    try:
        compatible = Path("/proc/device-tree/compatible").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return next((cc for soc, cc in TEGRA_CC.items() if soc in compatible), None)


def _desktop_gpu_cc() -> str | None:
    """The first GPU's compute capability from nvidia-smi, None where it cannot say (old driver, no GPU)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first and re.fullmatch(r"\d+\.\d+", first[0].strip()) else None


def _why_not_here(profile: DeviceProfile) -> str | None:
    """Why this machine cannot build the target's engines, or None when it may try."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: the wheel is there but its CUDA libraries are not
        return "tensorrt is not installed here"
    if profile.is_jetson:
        here = _jetson_cc()
        if here is None:
            return f"{profile.name} engines are built on the Jetson itself and this machine is not a Jetson"
    else:
        here = _desktop_gpu_cc()  # None where nvidia-smi cannot say: then TensorRT itself decides
    if here is not None and here != profile.compute_capability:
        return f"this machine's GPU is compute capability {here}, the {profile.name}'s is {profile.compute_capability}"
    return None


def build(bundle_dir: Path, target: str | None, require_engine: bool, dla: bool = False,
          log=lambda msg: None) -> dict:
    """`tinyprune build`: refresh the on-device script; build the engines here when this machine can."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if not isinstance(manifest.get("components"), dict) or not manifest["components"]:
        raise InputError(f"{bundle_dir}/manifest.json lists no components; is it a tinyprune bundle?")
    profile = load_profile(target or manifest["profile"])
    write_build_script(bundle_dir, manifest, profile, dla)
    result = {"target": profile.name, "script": SCRIPT, "readme": README, "engines": {}, "notice": None}
    reason = _why_not_here(profile)
    if reason is None:
        try:
            result["engines"] = build_engines(bundle_dir, manifest, profile, dla, log)
        except BackendMissing as e:
            reason = str(e)
    if reason is not None:
        result.update(notice=NOTICE, reason=reason)
        # Logs copied back from the device are read like our own.
        result["sparse"] = {name: s for name, comp in manifest["components"].items()
                            if (s := sparse_summary(bundle_dir, name, comp)) is not None}
    # The build/ files join the checksummed set, so `verify` stays green. The bundle's manifest.json is rewritten in
    # place here, so write_manifest replaces it atomically: a failed or killed write leaves the old one whole.
    write_manifest(bundle_dir, manifest)
    if reason is not None and require_engine:
        raise BackendMissing(f"no engine built: {reason}; run {SCRIPT} on the {profile.name}")
    return result
