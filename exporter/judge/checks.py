"""The gate checks, in one list (CHECKS), and the verdict over their results.

export, validate and bench run the same checks. A run feeds them phase by phase, each check in CHECKS
order, so that one copy of the weights is in memory at a time (3.4 GB each at Stable Diffusion size):

  dense(pipe)    the dense PyTorch pipeline (export: before it is pruned in place; validate: loaded first)
  pruned(pipe)   the pruned PyTorch pipeline: the PyTorch side of every comparison, then it can go
  bundle(root)   the ONNX files and the runtime on disk, no PyTorch weights loaded
  latency(rows)  bench's measured rows

A check takes part in a run that goes through one of its phases: export and validate run dense, pruned and
bundle (ONNX drift, images, runtime, quality), bench runs latency (budgets). done() gives their results
(frozen dataclasses, truthy within their gate); verdict() says which gate failed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Mapping

import numpy as np

from tinyprune.config import DeviceProfile, work_latent
from tinyprune.judge.drift import IMAGE_SEED, Drift, ImageDrift
from tinyprune.runtime.measure import page_out_weights

IMAGE_CHECK = "image dense vs pruned"
LARGE_MODEL_CHECKS = (1, 8)  # conditions, sampler steps of the image checks past config.CHECK_WORK
BUDGET_ROWS = {"unet": "unet", "generation": "generation"}  # latency budget key -> bench row measured against it


@dataclass(frozen=True)
class CheckOptions:
    """What one run asks of the checks; None = the default (the profile's gate, every label, 20 steps, ...)."""

    profile: DeviceProfile
    min_psnr_db: float | None = None  # dense-vs-pruned image gate
    image_checks: int | None = None  # class labels the image checks sample; 0 skips them
    image_steps: int | None = None
    quality: int | None = None  # digit-yardstick samples per class; 0 skips the quality gates
    max_fd_ratio: float | None = None
    min_accuracy: float | None = None
    is_demo: bool = False  # the quality gates apply by default to the demo pipeline only
    dense_bundle: Path | None = None  # validate --dense: its runtime is checked against the dense pipeline too
    precision: str = "fp32"  # of the bundle's files; lower ones are judged on the bundle's runtime (QualityCheck)
    image_latent: int | None = None  # set by for_pipeline; None: image_latent_size(profile)
    scaled: str | None = None  # why for_pipeline() shrank the image checks' defaults (a notice), None if it did not

    @property
    def images(self) -> bool:
        return self.image_checks != 0

    @property
    def min_image_psnr_db(self) -> float:
        return self.profile.min_image_psnr_db if self.min_psnr_db is None else self.min_psnr_db

    @property
    def latent(self) -> int | None:
        return self.image_latent if self.image_latent is not None else image_latent_size(self.profile)

    def for_pipeline(self, pipe) -> "CheckOptions":
        """These options with the image checks' unset defaults shrunk for a UNet whose call at the latent the checks
        would sample costs more than config.CHECK_WORK (Stable Diffusion and up); what was given stays as
        given."""
        if not self.images:
            return self
        size = self.latent or pipe.latent_size
        params = pipe.unet_params
        latent = work_latent(params, size)
        if latent is None:
            return self
        conditions, steps = LARGE_MODEL_CHECKS
        conditions = conditions if self.image_checks is None else self.image_checks
        steps = steps if self.image_steps is None else self.image_steps
        why = (f"image checks sample {conditions} condition(s), {steps} steps at latent {latent} "
               f"({latent * pipe.vae_scale} px) on this {params / 1e6:.0f}M-parameter UNet, not the defaults at "
               f"latent {size}; --image-checks and --image-steps ask for more")
        return replace(self, image_checks=conditions, image_steps=steps, image_latent=latent, scaled=why)


# --------------------------------------------------------------------------- the PyTorch and ONNX sides

def image_conditions(pipe, n: int | None = None) -> list:
    """The first n of the family's check conditions (all when n is None)."""
    return pipe.family.check_conditions(n)


def image_latent_size(profile: DeviceProfile) -> int | None:
    """The image gate samples at the profile's opt latent size (the size the ONNX files are exported and checked
    at); None = the model's native size. A Stable-Diffusion-sized model decoded at 512 px costs more than 1 GB of
    activations on top of its weights; a profile with `latent = [min, opt, max]` keeps the gate at opt."""
    return profile.latent.opt if profile.latent else None


class Samples:
    """The PyTorch images a run's checks draw, each set made once per (phase, conditions, steps, latent size): the
    image gate's pruned images are the runtime check's reference too (same seed, conditions and noise)."""

    def __init__(self):
        self._made: dict[tuple, np.ndarray] = {}

    def __call__(self, pipe, phase: str, conditions: list, steps: int | None, size: int | None) -> np.ndarray:
        from tinyprune.model.sampling import DEFAULT_STEPS, sample

        steps = steps or DEFAULT_STEPS
        key = (phase, tuple(repr(c) for c in conditions), steps, size)
        if key not in self._made:
            self._made[key] = sample(pipe, list(conditions), seed=IMAGE_SEED, steps=steps, size=size).numpy()
        return self._made[key]


@dataclass(frozen=True)
class TorchReference:
    """PyTorch's outputs for one component's drift feed at one batch size. Plain data: no reference back to the
    pipeline, which the export releases while these wait for the ONNX files."""

    component: str
    batch: int
    feed: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    tolerance: float


def torch_references(pipe, spec, profile: DeviceProfile) -> list[TorchReference]:
    """PyTorch outputs for the drift feeds of every component, computed before any ONNX session exists, at the
    opt shape and at the smallest batch (so that the dynamic batch axis is exercised too).

    With these in hand the PyTorch model can be released before onnxruntime loads its own copy of the
    weights, so that no stage holds two (3.4 GB each at Stable Diffusion size).
    """
    from tinyprune.export.specs import component_specs
    from tinyprune.judge.torch_runner import TorchRunner

    refs = []
    for comp in component_specs(pipe):
        with TorchRunner(comp.module(pipe), comp.inputs, comp.outputs) as torch_runner:
            for batch in sorted({spec.batch.opt, spec.batch.min}):
                feed = comp.dummy_feed(batch, spec.work_latent, seed=1)
                refs.append(TorchReference(comp.name, batch, feed, torch_runner(feed), comp.tolerance(profile)))
        # the component's file pages, just read, stop counting beside the next one's (at SD-1.5 size the text
        # encoder's 0.46 GiB stayed beside the UNet's run)
        page_out_weights()
    return refs


def ort_drift(refs: list[TorchReference], bundle_dir: Path) -> list[Drift]:
    """onnxruntime against the references of torch_references, one session at a time."""
    from tinyprune.runtime.runners import OrtRunner

    drifts = []
    for name in dict.fromkeys(r.component for r in refs):  # components in reference order, one session each
        with OrtRunner(Path(bundle_dir) / name / "model.onnx") as ort_runner:
            for r in (r for r in refs if r.component == name):
                got = ort_runner(r.feed)
                drifts += [Drift.of(f"{name}.{out} (batch {r.batch})", expected, got[out], r.tolerance)
                           for out, expected in r.outputs.items()]
    return drifts


# --------------------------------------------------------------------------- the checks

class Check:
    """One gate. `phases`: the run phases it takes part in; each keeps what the later ones need."""

    key = ""  # its entry in the run's result (report.json, --json)
    phases: tuple[str, ...] = ()

    def __init__(self, options: CheckOptions, stage, log, samples: Samples | None = None):
        self.options, self.stage, self.log = options, stage, log
        self.samples = samples or Samples()  # shared by a run's checks

    def dense(self, pipe) -> None:
        pass

    def pruned(self, pipe) -> None:
        pass

    def bundle(self, root: Path) -> None:
        pass

    def latency(self, rows: list[dict]) -> None:
        pass

    def results(self) -> tuple:
        raise NotImplementedError

    @staticmethod
    def entry(results: tuple):
        """The JSON-ready entry of its results."""
        return [r.to_dict() for r in results]


class OnnxDriftCheck(Check):
    """Every ONNX output against PyTorch's, per component (onnxruntime CPU); gated on the spec's tolerance."""

    key, phases = "onnx_drift", ("pruned", "bundle")

    def pruned(self, pipe):
        from tinyprune.export.specs import export_spec
        from tinyprune.export.writer import MAX_EXPORT_OPSET

        with self.stage("pytorch references"):
            self.refs = torch_references(pipe, export_spec(pipe, self.options.profile, MAX_EXPORT_OPSET),
                                         self.options.profile)

    def bundle(self, root):
        with self.stage("validate onnx drift"):
            self.drifts = tuple(ort_drift(self.refs, root))
        del self.refs

    def results(self):
        return self.drifts


class ImageDriftCheck(Check):
    """Dense against pruned final images, same seeds, labels and initial noise; gated on PSNR."""

    key, phases = "image_drift", ("dense", "pruned")

    def dense(self, pipe):
        o, self.ref = self.options, None
        if o.images:
            with self.stage("dense reference images"):
                self.ref = self.samples(pipe, "dense", image_conditions(pipe, o.image_checks), o.image_steps,
                                        o.latent)

    def pruned(self, pipe):
        o = self.options
        if self.ref is None:
            self.drift = ImageDrift.skip(IMAGE_CHECK, o.min_image_psnr_db, "--image-checks 0")
            return
        with self.stage("validate dense vs pruned images"):
            got = self.samples(pipe, "pruned", image_conditions(pipe, o.image_checks), o.image_steps, o.latent)
            self.drift = ImageDrift.of(IMAGE_CHECK, self.ref, got, o.min_image_psnr_db)
        self.ref = None

    def results(self):
        return (self.drift,)

    @staticmethod
    def entry(results):
        return results[0].to_dict()


class RuntimeDriftCheck(Check):
    """The bundle's torch-free runtime against the PyTorch pipeline, images from the same noise; gated on PSNR.
    With options.dense_bundle the dense bundle's runtime is checked against the dense pipeline too."""

    key, phases = "runtime_drift", ("dense", "pruned", "bundle")
    def _reference(self, pipe, what: str):
        from tinyprune.judge.runtime_check import torch_e2e_reference

        if not self.options.images:
            return None
        o = self.options
        with self.stage(f"{what} runtime reference images"):
            return torch_e2e_reference(pipe, o.image_steps, o.image_checks, o.latent, self.samples, what)

    def dense(self, pipe):
        self.dense_ref = self._reference(pipe, "dense") if self.options.dense_bundle is not None else None

    def pruned(self, pipe):
        self.pruned_ref = self._reference(pipe, "pruned")

    def bundle(self, root):
        from tinyprune.judge.runtime_check import runtime_check

        o = self.options
        bundles = {"pruned": (root, self.pruned_ref)}
        if o.dense_bundle is not None:
            bundles["dense"] = (o.dense_bundle, self.dense_ref)
        with self.stage("validate runtime vs pytorch images"):
            self.drifts = tuple(runtime_check(b, ref, o.profile, what, o.image_steps)
                                for what, (b, ref) in bundles.items())
        self.pruned_ref = self.dense_ref = None

    def results(self):
        return self.drifts


class QualityCheck(Check):
    """The digit yardstick's gates (FD ratio to dense, class accuracy), where it applies (judge/gates.py): dense
    PyTorch samples against the pruned PyTorch pipeline's, or, when the bundle's files are fp16 or int8, against
    the bundle runtime's (what the device will run)."""

    key, phases = "quality", ("dense", "pruned", "bundle")

    def dense(self, pipe):
        from tinyprune.judge import gates

        self.dense_q = self.pruned_q = self.result = None
        why_not = gates.why_skipped(pipe, self.options.quality, is_demo=self.options.is_demo)
        if why_not:
            self.log(f"quality gates not applied: {why_not}")
            return
        with self.stage("dense quality samples"):
            self.dense_q = gates.draw(pipe, self.options.quality or gates.DEFAULT_QUALITY_PER_CLASS)

    def pruned(self, pipe):
        from tinyprune.judge import gates
        from tinyprune.judge.quality import NUM_DIGITS

        if self.dense_q is None or self.options.precision != "fp32":
            return
        o = self.options
        with self.stage("pruned quality samples"):
            self.pruned_q = gates.draw(pipe, len(self.dense_q.labels) // NUM_DIGITS)
            self.result = gates.judge(self.dense_q, self.pruned_q, o.profile, o.max_fd_ratio, o.min_accuracy)

    def bundle(self, root):
        from tinyprune.judge import gates

        o = self.options
        if self.dense_q is None or o.precision == "fp32":
            return
        with self.stage(f"pruned {o.precision} quality samples (bundle runtime)"):
            self.pruned_q = gates.draw_runtime(root, self.dense_q)
            self.result = gates.judge(self.dense_q, self.pruned_q, o.profile, o.max_fd_ratio, o.min_accuracy)

    def write_grid(self, path: Path) -> Path | None:
        """Dense samples above pruned ones (report/grid.png), where the gates ran."""
        from tinyprune.judge import gates

        return None if self.result is None else gates.write_grid(self.dense_q, self.pruned_q, path)

    def results(self):
        return () if self.result is None else (self.result,)

    @staticmethod
    def entry(results):
        return results[0].to_dict() if results else None  # None: the gates were not applied


class LatencyBudgetCheck(Check):
    """The profile's latency_budget_ms against the pruned model's measured p50 (bench)."""

    key, phases = "budgets", ("latency",)

    def latency(self, rows):
        from tinyprune.judge.gates import LatencyBudget

        budgets = []
        for key, what in BUDGET_ROWS.items():
            row = next((r for r in rows if r["model"] == "pruned" and r["what"] == what), None)
            if key in self.options.profile.latency_budget_ms and row is not None:
                budgets.append(LatencyBudget(key, self.options.profile.latency_budget_ms[key], row["p50_ms"]))
        self.budgets = tuple(budgets)

    def results(self):
        return self.budgets

    @staticmethod
    def entry(results):
        return {b.key: b.to_dict() for b in results}


CHECKS: tuple[type[Check], ...] = (OnnxDriftCheck, ImageDriftCheck, RuntimeDriftCheck, QualityCheck,
                                   LatencyBudgetCheck)
_BY_KEY = {c.key: c for c in CHECKS}


# --------------------------------------------------------------------------- running them, and the verdict

@dataclass(frozen=True)
class Verdict:
    """Which gates failed, in CHECKS order; truthy when none did."""

    failed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.failed

    def message(self, suffix: str = "") -> str:
        """The one line on stderr."""
        return f"gate failed: {', '.join(self.failed)}{suffix}"


def verdict(results: Iterable) -> Verdict:
    """The gate verdict over results that know their gate (truthy within it, failures() naming what is over)."""
    return Verdict(tuple(f for r in results for f in r.failures()))


@dataclass(frozen=True)
class Checked:
    """What one run's checks found: per check that took part, in CHECKS order, its results."""

    results: Mapping[str, tuple]  # check key -> results

    @property
    def verdict(self) -> Verdict:
        return verdict(r for rs in self.results.values() for r in rs)

    def __bool__(self) -> bool:
        return bool(self.verdict)

    def to_dict(self) -> dict:
        v = self.verdict
        return {"checks": list(self.results), **{k: _BY_KEY[k].entry(rs) for k, rs in self.results.items()},
                "ok": bool(v), "failed": list(v.failed)}


@contextmanager
def _logged(log, name: str):
    log(name)
    yield


class Checks:
    """CHECKS for one run, fed phase by phase. stage(name) wraps each step (export: its timed stage log;
    default: one log line)."""

    def __init__(self, options: CheckOptions, log: Callable[[str], None] = lambda msg: None,
                 stage: Callable[[str], ContextManager] | None = None):
        stage = stage or (lambda name: _logged(log, name))
        samples = Samples()
        self.checks = tuple(cls(options, stage, log, samples) for cls in CHECKS)
        self._phases: list[str] = []

    def _feed(self, phase: str, arg) -> None:
        self._phases.append(phase)
        for check in self.checks:
            if phase in check.phases:
                getattr(check, phase)(arg)

    def dense(self, pipe) -> None:
        self._feed("dense", pipe)

    def pruned(self, pipe) -> None:
        self._feed("pruned", pipe)

    def bundle(self, root: Path) -> None:
        self._feed("bundle", Path(root))

    def latency(self, rows: list[dict]) -> None:
        self._feed("latency", rows)

    def get(self, cls: type[Check]) -> Check:
        return next(c for c in self.checks if isinstance(c, cls))

    def done(self) -> Checked:
        return Checked({c.key: c.results() for c in self.checks if set(c.phases) & set(self._phases)})


def checks_run(phases: Iterable[str]) -> list[str]:
    """The keys of the checks a run through `phases` takes part in, in CHECKS order."""
    return [c.key for c in CHECKS if set(c.phases) & set(phases)]
