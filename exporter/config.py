"""Frozen configuration, validated once at the edge: device profiles and the prune/export specs."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from tinyprune.errors import InputError

# structured methods remove channels and heads (pattern "channel"): faster on every runtime (prune/structured/)
STRUCTURED_METHODS = ("diff-pruning", "ld-pruner", "ecodiff")
METHODS = ("magnitude", "l1-grad") + STRUCTURED_METHODS
PATTERNS = ("unstructured", "2:4", "auto", "channel")
AUTO_STRUCTURED = "diff-pruning"  # what --method auto picks for targets without sparse tensor cores
SCOPES = ("global", "layer")
COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "text_encoder")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Range:
    """min/opt/max of one dynamic dimension, as TensorRT optimization profiles want it."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    compute_capability: str  # "" for CPU-only targets
    sparse_tensor_cores: bool
    trt_version: str  # "" where the target has no TensorRT
    max_opset: int
    precisions: tuple[str, ...]
    dla_cores: int
    memory_budget_mb: int
    workspace_mb: int
    batch: Range
    latent: Range | None  # None: the model's native latent size, fixed
    tolerance: dict[str, float]  # max abs ONNX-vs-PyTorch drift per component
    min_image_psnr_db: float  # dense vs pruned final image
    max_fd_ratio: float
    min_accuracy: float
    latency_budget_ms: dict[str, float]
    # torch-free runtime (numpy schedulers + ONNX) against the PyTorch pipeline, same seed and noise; optional
    # [gates] field. fp32 onnxruntime lands far above it; the margin is for fp16 engines.
    min_runtime_psnr_db: float = 30.0
    # [precision.fp16] / [precision.int8]: drift tolerances and runtime PSNR of ONNX files in that precision
    precision_gates: dict[str, "PrecisionGates"] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    jetpack: str = ""
    source: str = field(default="", compare=False)

    @property
    def has_tensorrt(self) -> bool:
        return bool(self.trt_version)

    @property
    def is_jetson(self) -> bool:
        return bool(self.jetpack)

    def for_precision(self, precision: str) -> "DeviceProfile":
        """This profile with the gates of ONNX files in `precision`: its [precision.<p>] tolerances (components it
        does not list keep the fp32 ones: they stay float) and runtime PSNR."""

        if precision == "fp32":
            return self
        g = self.precision_gates[precision]
        return replace(self, tolerance={**self.tolerance, **g.tolerance},
                       min_runtime_psnr_db=g.min_runtime_psnr_db)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d.pop("source")
        return d


@dataclass(frozen=True)
class PrecisionGates:
    """A profile's [precision.<p>] table: fp16 rounding and int8 quantization move ONNX outputs further from
    PyTorch's fp32 than fp32 reordering does, so they get their own drift tolerances and runtime PSNR."""

    tolerance: dict[str, float]
    min_runtime_psnr_db: float


def _profiles_dir():
    return resources.files("tinyprune.profiles")


def _profile_files() -> dict[str, object]:
    return {p.name[:-5]: p for p in _profiles_dir().iterdir() if p.name.endswith(".toml")}


def _aliases() -> dict[str, str]:
    table = {}
    for name, path in _profile_files().items():
        data = tomllib.loads(path.read_text())
        for alias in data.get("aliases", []):
            table[alias] = name
    return table


def profile_names() -> list[str]:
    return sorted(_profile_files())


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name or alias, or a TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml"):
        if not path.is_file():
            raise InputError(f"profile file {name_or_path} does not exist")
        return parse_profile(path.read_text(), str(path))
    files = _profile_files()
    name = _aliases().get(name_or_path, name_or_path)
    if name not in files:
        known = ", ".join(sorted(list(files) + list(_aliases())))
        raise InputError(f"unknown target '{name_or_path}'; known targets: {known}")
    return parse_profile(files[name].read_text(), f"profiles/{name}.toml")


def _get(data: dict, key: str, kind, where: str, default=...):
    if key not in data:
        if default is ...:
            raise InputError(f"{where}: missing field '{key}'")
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} {value!r}")
    return value


def _range(value, key: str, where: str) -> Range:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise InputError(f"{where}: field '{key}' must be [min, opt, max] integers, got {value!r}")
    lo, opt, hi = value
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"{where}: field '{key}' must satisfy 1 <= min <= opt <= max, got {value!r}")
    return Range(lo, opt, hi)


def parse_profile(text: str, where: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{where}: not valid TOML ({e})") from None
    number = (int, float)
    cc = _get(data, "compute_capability", str, where)
    sparse = _get(data, "sparse_tensor_cores", bool, where)
    try:
        cc_value = float(cc) if cc else 0.0
    except ValueError:
        raise InputError(f"{where}: field 'compute_capability' must look like \"8.7\" or be \"\", got {cc!r}") from None
    if sparse and cc_value < 8.0:
        raise InputError(
            f"{where}: field 'sparse_tensor_cores' is true but compute capability '{cc}' < 8.0 has none"
        )
    shapes = _get(data, "shapes", dict, where)
    latent = shapes.get("latent", "native")
    tolerance = _tolerances(_get(data, "tolerance", dict, where), f"{where} [tolerance]")
    gates = _get(data, "gates", dict, where)
    latency = _get(data, "latency_budget_ms", dict, where, {})
    for key, ms in latency.items():
        if not isinstance(ms, number) or isinstance(ms, bool) or not ms > 0:
            raise InputError(f"{where}: [latency_budget_ms] field '{key}' must be a positive number, got {ms!r}")
    for key in ("dla_cores", "memory_budget_mb", "workspace_mb"):
        if _get(data, key, int, where) < 0:
            raise InputError(f"{where}: field '{key}' must be >= 0")
    if data["workspace_mb"] > data["memory_budget_mb"]:
        raise InputError(f"{where}: field 'workspace_mb' exceeds 'memory_budget_mb'")
    aliases = _get(data, "aliases", list, where, [])
    if not all(isinstance(a, str) for a in aliases):
        raise InputError(f"{where}: field 'aliases' must be a list of strings")
    precisions = tuple(_get(data, "precisions", list, where))
    if not precisions:
        raise InputError(f"{where}: field 'precisions' is empty")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise InputError(f"{where}: field 'precisions' has unknown values {sorted(unknown)}")
    precision_gates = _precision_gates(_get(data, "precision", dict, where, {}), precisions, where)
    return DeviceProfile(
        name=_get(data, "name", str, where),
        description=_get(data, "description", str, where),
        compute_capability=cc,
        sparse_tensor_cores=sparse,
        trt_version=_get(data, "trt_version", str, where),
        jetpack=_get(data, "jetpack", str, where, ""),
        max_opset=_get(data, "max_opset", int, where),
        precisions=precisions,
        dla_cores=_get(data, "dla_cores", int, where),
        memory_budget_mb=_get(data, "memory_budget_mb", int, where),
        workspace_mb=_get(data, "workspace_mb", int, where),
        batch=_range(_get(shapes, "batch", list, f"{where} [shapes]"), "batch", f"{where} [shapes]"),
        latent=None if latent == "native" else _range(latent, "latent", f"{where} [shapes]"),
        tolerance=tolerance,
        min_image_psnr_db=float(_get(gates, "min_image_psnr_db", number, f"{where} [gates]")),
        max_fd_ratio=float(_get(gates, "max_fd_ratio", number, f"{where} [gates]")),
        min_accuracy=float(_get(gates, "min_accuracy", number, f"{where} [gates]")),
        latency_budget_ms={k: float(v) for k, v in latency.items()},
        min_runtime_psnr_db=float(_get(gates, "min_runtime_psnr_db", number, f"{where} [gates]", 30.0)),
        precision_gates=precision_gates,
        aliases=tuple(aliases),
        source=where,
    )


def _tolerances(table: dict, where: str) -> dict[str, float]:
    for comp, tol in table.items():
        if comp not in COMPONENTS:
            raise InputError(f"{where} has unknown component '{comp}'")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise InputError(f"{where} field '{comp}' must be a positive number, got {tol!r}")
    return {k: float(v) for k, v in table.items()}


def _precision_gates(tables: dict, precisions: tuple[str, ...], where: str) -> dict[str, PrecisionGates]:
    """[precision.fp16] / [precision.int8]: one for every non-fp32 precision the profile lists, none for others."""
    out = {}
    for p in precisions:
        if p == "fp32":
            continue
        table = tables.get(p)
        if not isinstance(table, dict):
            raise InputError(f"{where}: 'precisions' lists {p} but there is no [precision.{p}] table of its gates")
        at = f"{where} [precision.{p}]"
        out[p] = PrecisionGates(_tolerances(_get(table, "tolerance", dict, at), f"{at} tolerance"),
                                float(_get(table, "min_runtime_psnr_db", (int, float), at)))
    extra = set(tables) - set(out)
    if extra:
        raise InputError(f"{where}: [precision.{sorted(extra)[0]}] for a precision 'precisions' does not list")
    return out


def parse_sparsity(value: str | float) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--sparsity must be a number in [0, 1), got '{value}'") from None
    if math.isnan(s) or not 0.0 <= s < 1.0:
        raise InputError(f"--sparsity must be in [0, 1), got {value}")
    return s


DEFAULT_RECOVERY_STEPS = 200  # l1-grad's recovery when --recovery-steps is not given; magnitude's is 0
# Structured pruning needs distillation (on the demo at --speedup 2: FD 15.7x dense, class accuracy 0.15 without
# it). 2000 steps with the rate decaying to 0 (prune/recovery.py) take that pruning of the demo to FD 1.005x and
# accuracy 0.99 in about 4 minutes here; 2000 steps at the old constant 2e-4 left it at 1.42x and 0.97
# (benchmarks/results/speedup.md).
DEFAULT_STRUCTURED_RECOVERY_STEPS = 2000
# Data-free latents a structured method's distillation reads by default on a UNet within config.CHECK_WORK: at
# --speedup 2 on the demo its 34-prompt set (the other methods' default) left FD 4.3x dense, 200 latents 1.04x
# (both under an earlier early-stop rule: benchmarks/results/speedup.md); the dense model draws them in about 17 s
STRUCTURED_CALIBRATION_SAMPLES = 200
# fp32 weights past which the prune stage keeps no second copy of the UNet (Stable Diffusion 1.5's 3.2 GiB is held to
# 1.5x its weights): structured recovery distils lean (prune/recovery.py), and a CPU target's latency-aware allocation
# weighs MACs, not a measured onnxruntime table, whose session would hold the weights again beside PyTorch's. The
# demo's UNet and precision.py's 79.7M one stay under it.
LARGE_UNET_BYTES = 2 ** 30


def large_unet(unet) -> bool:
    """Whether a UNet's parameters are past LARGE_UNET_BYTES in fp32."""
    return sum(p.numel() for p in unet.parameters()) * 4 > LARGE_UNET_BYTES


RECOVERY_TARGETS = ("distill", "noise")


@dataclass(frozen=True)
class L1GradSpec:
    """Options of the l1-grad method ("Towards Tiny Diffusion") and of the recovery phase.

    score = alpha * |w| / mean|w| + beta * G / mean G, where G is |dL/dw| of the denoising loss averaged
    over calibration batches and both means run over all prunable weights of the UNet (global
    normalisation): alpha = beta = 1 weighs magnitude and gradient equally on average, beta = 0 ranks
    exactly as magnitude, alpha = 0 by gradient alone. Recovery: Adam (lr) on the denoising loss plus
    l1 * sum|w| over the prunable weights, recovery_steps in all, split over `iterations` prune steps
    (None: DEFAULT_RECOVERY_STEPS for l1-grad, 0 for magnitude). distill (default): the recovery's target is
    the dense UNet's epsilon on the same x_t instead of the true noise; it costs a second copy of the UNet, and
    on the demo it is what makes recovery help (benchmarks/results/unstructured.md: FD 0.91x dense distilled,
    2.05x fitting the noise of 40 data-free calibration latents).
    """

    alpha: float = 1.0
    beta: float = 1.0
    l1: float = 1e-5
    recovery_steps: int | None = None
    iterations: int = 4
    lr: float = 1e-4
    distill: bool = True

    @staticmethod
    def parse(alpha=None, beta=None, l1=None, recovery_steps=None, iterations=None, lr=None,
              distill=None, recovery_target=None) -> "L1GradSpec":
        """CLI values (None = default) validated once; recovery_target is the CLI's word for distill."""
        d = L1GradSpec()
        if recovery_target is not None:
            if recovery_target not in RECOVERY_TARGETS:
                raise InputError(f"unknown --recovery-target '{recovery_target}'; known: {', '.join(RECOVERY_TARGETS)}")
            distill = recovery_target == "distill"
        vals = {"alpha": d.alpha if alpha is None else alpha, "beta": d.beta if beta is None else beta,
                "l1": d.l1 if l1 is None else l1, "lr": d.lr if lr is None else lr}
        for key, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                name = "lr" if key == "lr" else f"--{key}"  # lr has no CLI option: only the Python API sets it
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if vals["alpha"] == 0 and vals["beta"] == 0:
            raise InputError("--alpha and --beta are both 0: the l1-grad score would be all zeros")
        if vals["lr"] == 0:
            raise InputError("lr must be > 0")
        for key, v, lo in (("recovery-steps", recovery_steps, 0), ("iterations", iterations, 1)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise InputError(f"--{key} must be an integer >= {lo}, got {v!r}")
        return L1GradSpec(float(vals["alpha"]), float(vals["beta"]), float(vals["l1"]), recovery_steps,
                          d.iterations if iterations is None else iterations, float(vals["lr"]),
                          d.distill if distill is None else bool(distill))


COST_MODELS = ("ort", "macs")
TENSOR_CORE_CHANNELS = 8  # TensorRT's fp16/int8 tensor-core kernels: channel counts in multiples of 8
NORMALIZERS = ("mean", "none")


@dataclass(frozen=True)
class StructuredSpec:
    """Options of the structured methods (prune/structured/run.py, prune/structured/allocation.py).

    target_macs: fraction of the dense UNet's MACs to keep, in (0, 1]; speedup: the UNet's predicted speed-up over
    the dense one to reach, on the cost model (> 1); latency_budget_ms: the UNet call's measured onnxruntime time
    here to stay within (the cost table's batch); none of them: --sparsity (fraction of prunable parameters
    removed) is the target. latency_aware: weigh each group by its cost -- measured onnxruntime CPU time ("ort")
    or MACs ("macs") -- instead of its parameters; None: by the target (PruneSpec.resolve: on where only structure
    pays, ort on CPU targets, MACs on GPU ones). normalize: per-group score normalisation ("mean", Torch-Pruning's;
    "none"). recovery_minutes caps the distillation's wall time. channel_multiple: every thinned group keeps a
    channel count that is a multiple of it (for_target: 8 on TensorRT targets, whose fp16/int8 tensor-core kernels
    want channels in multiples of 8; 1 elsewhere).
    """

    target_macs: float | None = None
    latency_aware: bool | None = None
    cost_model: str | None = None
    normalize: str = "mean"
    recovery_minutes: float | None = None
    speedup: float | None = None
    latency_budget_ms: float | None = None
    channel_multiple: int = 1

    @property
    def latency_target(self) -> bool:
        return self.speedup is not None or self.latency_budget_ms is not None

    @staticmethod
    def parse(target_macs=None, latency_aware=None, cost_model=None, normalize=None,
              recovery_minutes=None, speedup=None, latency_budget_ms=None) -> "StructuredSpec":
        d = StructuredSpec()
        if target_macs is not None:
            try:
                target_macs = float(target_macs)
            except (TypeError, ValueError):
                raise InputError(f"--target-macs must be a number in (0, 1], got '{target_macs}'") from None
            if math.isnan(target_macs) or not 0.0 < target_macs <= 1.0:
                raise InputError(f"--target-macs is the fraction of the dense MACs to keep, in (0, 1]; got {target_macs}")
        speedup = _positive("--speedup", speedup, above=1.0)
        latency_budget_ms = _positive("--latency-budget-ms", latency_budget_ms)
        given = [f for f, v in (("--target-macs", target_macs), ("--speedup", speedup),
                                ("--latency-budget-ms", latency_budget_ms)) if v is not None]
        if len(given) > 1:
            raise InputError(f"{' and '.join(given)} are both targets; give one")
        if latency_aware is False and (speedup is not None or latency_budget_ms is not None):
            raise InputError(f"{given[0]} is a latency target: it cannot go with --no-latency-aware")
        if cost_model is not None and cost_model not in COST_MODELS:
            raise InputError(f"unknown --cost-model '{cost_model}'; known: {', '.join(COST_MODELS)}")
        if cost_model is not None and latency_aware is False:
            raise InputError("--cost-model is the cost of latency-aware allocation: drop --no-latency-aware")
        if latency_budget_ms is not None and cost_model == "macs":
            raise InputError("--latency-budget-ms is measured time: it needs --cost-model ort")
        normalize = d.normalize if normalize is None else normalize
        if normalize not in NORMALIZERS:
            raise InputError(f"unknown normalize '{normalize}'; known: {', '.join(NORMALIZERS)}")
        if recovery_minutes is not None and (isinstance(recovery_minutes, bool) or not isinstance(recovery_minutes, (int, float))
                                             or not math.isfinite(recovery_minutes) or recovery_minutes <= 0):
            raise InputError(f"--recovery-minutes must be a number > 0, got {recovery_minutes!r}")
        return StructuredSpec(target_macs, None if latency_aware is None else bool(latency_aware), cost_model,
                              normalize, None if recovery_minutes is None else float(recovery_minutes),
                              speedup, latency_budget_ms)

    def for_target(self, profile: "DeviceProfile") -> tuple["StructuredSpec", list[str]]:
        """The spec with latency_aware and cost_model settled for `profile`, and the notice saying so. Where only
        structure pays (no sparse tensor cores: CPUs, Xavier, Nano) the allocation is latency-aware by default;
        the cost model is measured onnxruntime time where the target runs onnxruntime on a CPU, MACs on a GPU
        (the GPU is not here to measure)."""
        cost_model = self.cost_model or ("macs" if profile.has_tensorrt else "ort")
        if self.latency_budget_ms is not None and cost_model == "macs":
            raise InputError(f"--latency-budget-ms is measured onnxruntime CPU time; {profile.name} is a GPU target "
                             "(use --speedup, on its MACs)")
        latency_aware = self.latency_aware
        notices = []
        if latency_aware is None:
            latency_aware = self.latency_target or not profile.sparse_tensor_cores
            if latency_aware and not self.latency_target:
                notices.append(f"structured on {profile.name} (only a smaller network is faster there): latency-aware "
                               f"allocation by {'measured onnxruntime time' if cost_model == 'ort' else 'MACs'} "
                               "(--no-latency-aware: by parameters)")
        return replace(self, latency_aware=latency_aware, cost_model=cost_model,
                       channel_multiple=TENSOR_CORE_CHANNELS if profile.has_tensorrt else 1), notices


def _positive(flag: str, value, above: float = 0.0) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{flag} must be a number > {above:g}, got '{value}'") from None
    if not math.isfinite(value) or value <= above:
        raise InputError(f"{flag} must be a number > {above:g}, got {value:g}")
    return value


DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # accelerate's names (its --mixed_precision and ACCELERATE_MIXED_PRECISION)


@dataclass(frozen=True)
class ComputeSpec:
    """Where the prune stage's learning and scoring run (prune/distributed.py): device "auto" (CUDA when torch sees
    a GPU), "cpu" or "cuda"; mixed_precision: autocast dtype of calibration, scoring and recovery forwards (None:
    what `accelerate launch --mixed_precision` set, else "no"); gradient_checkpointing: recompute UNet blocks in the
    backward passes of recovery and EcoDiff's trajectory instead of keeping their activations. Baking, saving and
    ONNX export always run on fp32 CPU weights."""

    device: str = "auto"
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False

    @staticmethod
    def parse(device=None, mixed_precision=None, gradient_checkpointing=None) -> "ComputeSpec":
        device = "auto" if device is None else device
        if device not in DEVICES:
            raise InputError(f"unknown --device '{device}'; known: {', '.join(DEVICES)}")
        if mixed_precision is not None and mixed_precision not in MIXED_PRECISIONS:
            raise InputError(f"unknown --mixed-precision '{mixed_precision}'; known: {', '.join(MIXED_PRECISIONS)}")
        return ComputeSpec(device, mixed_precision, bool(gradient_checkpointing))


@dataclass(frozen=True)
class PruneSpec:
    method: str = "magnitude"
    sparsity: float = 0.43
    pattern: str = "unstructured"  # resolved: never "auto" once built by resolve()
    scope: str = "global"
    prune_vae: bool = False
    seed: int = 0
    l1grad: L1GradSpec = L1GradSpec()
    calibration: str | None = None  # image folder for calibration batches; None = data-free (dense samples)
    structured: StructuredSpec = StructuredSpec()
    prune_text_encoder: bool = False
    calibration_samples: int | None = None  # data-free samples (or images) calibration reads; None: the default

    @property
    def recovery_steps(self) -> int:
        if self.l1grad.recovery_steps is not None:
            return self.l1grad.recovery_steps
        if self.method == "l1-grad":
            return DEFAULT_RECOVERY_STEPS
        return DEFAULT_STRUCTURED_RECOVERY_STEPS if self.pattern == "channel" else 0

    @property
    def default_calibration_samples(self) -> int | None:
        """Data-free latents when --calibration-samples is not given (None: the family's calibration set)."""
        return STRUCTURED_CALIBRATION_SAMPLES if self.pattern == "channel" and self.recovery_steps > 0 else None

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration batches: gradients, 2:4 sensitivity or recovery."""
        return self.method == "l1-grad" or self.pattern in ("2:4", "channel") or self.recovery_steps > 0

    @staticmethod
    def resolve(method: str, sparsity, pattern: str, scope: str, prune_vae: bool, profile: DeviceProfile,
                seed: int = 0, l1grad: L1GradSpec | None = None,
                calibration: str | None = None, structured: StructuredSpec | None = None,
                prune_text_encoder: bool = False,
                calibration_samples: int | None = None) -> tuple["PruneSpec", list[str]]:
        """Validate the user's choices against the target; returns the spec and notices to show."""
        notices = []
        s = parse_sparsity(sparsity)
        if method == "auto":  # zeros pay only on sparse tensor cores; everywhere else only a smaller network does
            if profile.sparse_tensor_cores:
                method = "l1-grad" if "l1-grad" in METHODS else "magnitude"
                pattern = "2:4"
            else:
                method, pattern = AUTO_STRUCTURED, "channel"
            notices.append(f"--method auto: {method} with pattern {pattern} for {profile.name} "
                           f"({'has' if profile.sparse_tensor_cores else 'no'} sparse tensor cores)")
        if method in STRUCTURED_METHODS:
            if pattern == "2:4":
                raise InputError(f"--method {method} removes channels and heads (pattern channel); 2:4 needs "
                                 "--method magnitude or l1-grad")
            if prune_vae or prune_text_encoder:
                flag = "--prune-vae" if prune_vae else "--prune-text-encoder"
                raise InputError(f"--method {method} prunes the UNet only; drop {flag}")
            pattern = "channel"
        elif pattern == "channel":
            raise InputError(f"--pattern channel needs a structured method: {', '.join(STRUCTURED_METHODS)}")
        structured = structured or StructuredSpec()
        if method not in STRUCTURED_METHODS:
            for flag, v in (("--target-macs", structured.target_macs), ("--speedup", structured.speedup),
                            ("--latency-budget-ms", structured.latency_budget_ms)):
                if v is not None:
                    raise InputError(f"{flag} needs a structured method: {', '.join(STRUCTURED_METHODS)}")
        else:
            structured, more = structured.for_target(profile)
            notices += more
        if method not in METHODS:
            raise InputError(f"unknown --method '{method}'; known methods: {', '.join(METHODS)}")
        if pattern not in PATTERNS:
            raise InputError(f"unknown --pattern '{pattern}'; known patterns: {', '.join(PATTERNS)}")
        if scope not in SCOPES:
            raise InputError(f"unknown --scope '{scope}'; known scopes: {', '.join(SCOPES)}")
        if pattern == "auto":
            pattern = "2:4" if profile.sparse_tensor_cores else "unstructured"
        if pattern == "unstructured":
            notices.append(
                f"unstructured zeros run as dense math and will not be faster on {profile.name}"
                + ("; --pattern 2:4 uses its sparse tensor cores" if profile.sparse_tensor_cores
                   else " (it has no sparse tensor cores)")
            )
        if pattern == "2:4" and not profile.sparse_tensor_cores:
            raise InputError(
                f"pattern 2:4 needs sparse tensor cores (compute capability >= 8.0); target {profile.name} "
                f"has none: use --pattern unstructured"
            )
        if calibration is not None and not Path(calibration).is_dir():
            raise InputError(f"--calibration {calibration} is not a directory of images")
        if calibration_samples is not None and (isinstance(calibration_samples, bool)
                                                or not isinstance(calibration_samples, int) or calibration_samples < 1):
            raise InputError(f"--calibration-samples must be an integer >= 1, got {calibration_samples!r}")
        return PruneSpec(method, s, pattern, scope, prune_vae, seed, l1grad or L1GradSpec(), calibration,
                         structured, prune_text_encoder, calibration_samples), notices


@dataclass(frozen=True)
class ExportSpec:
    opset: int
    batch: Range
    latent: Range  # latent height/width
    external_data_threshold: int = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom
    work: int | None = None  # latent the trace and the checks run at, when not latent.opt (work_latent)

    @property
    def work_latent(self) -> int:
        return self.work or self.latent.opt

    @property
    def spatial_dynamic(self) -> bool:
        """Height and width are dynamic axes: the profile spans sizes, or the trace runs at another size."""
        return self.latent.min != self.latent.max or self.work_latent != self.latent.opt


# A UNet call costs about params x latent^2. Past SD-1.5's UNet at latent 16 (128 px) the work done at export time
# (the ONNX trace, the drift and image checks) runs at a smaller latent than the profile's (work_latent): at native
# 512 px, four conditions and 20 steps, SD-1.5's checks took an hour and 11.6 GiB on a 2-core CPU, its trace with plain
# attention 7.5 GiB; at this work a call takes about a second there. The files keep the profile's shapes.
CHECK_WORK = 860e6 * 16 ** 2


def work_latent(params: int, latent: int) -> int | None:
    """The latent size (a multiple of 8, at least 8) whose UNet call costs at most CHECK_WORK, for a UNet of `params`
    parameters checked at `latent`; None when `latent` itself is within it."""
    if params * latent ** 2 <= CHECK_WORK:
        return None
    return max(8, int((CHECK_WORK / params) ** 0.5) // 8 * 8)


def list_profiles() -> list[dict]:
    return [load_profile(name).to_dict() for name in profile_names()]
