"""The runtime's numpy schedulers against diffusers', whole trajectories: configs as real pipelines ship them, the
same deterministic fake model on both sides (so errors compound as they would), and for the stochastic ones the
same noise (diffusers' randn_tensor patched to draw from a twin of the numpy Generator the runtime passes)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyprune.errors import InputError
from tinyprune.runtime.schedulers import (CLASS_NAMES, DDPM, KINDS, LCM, PNDM, SCHEDULERS, DPMSolverMultistep,
                                          EulerAncestral, make_scheduler)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

# Every intermediate sample within TOL of diffusers', relative to the largest magnitude that element has had so far
# in the trajectory (and at least 1): float32 keeps ~7 digits of the largest value an element went through (4096
# for a zero-terminal-SNR schedule's first sigma), so any float32 implementation, diffusers' included, carries
# that absolute error from then on. The two sides differ only where torch's float32 pow/exp/log round a last bit
# differently from numpy's; the worst measured is 3e-6 (DDPM, 1000 steps).
TOL = 1e-5
SHAPE = (2, 4, 8, 8)
F32 = np.float32

# scheduler_config.json as the hub ships them
SD15_PNDM = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                 trained_betas=None, clip_sample=False)
SD21_DDIM = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, trained_betas=None)
SDXL_EULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False, interpolation_type="linear",
                  num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None,
                  use_karras_sigmas=False)
LCM_DREAMSHAPER = dict(_class_name="LCMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, clip_sample_range=1.0, dynamic_thresholding_ratio=0.995,
                       num_train_timesteps=1000, original_inference_steps=50, prediction_type="epsilon",
                       rescale_betas_zero_snr=False, sample_max_value=1.0, set_alpha_to_one=True, steps_offset=1,
                       thresholding=False, timestep_scaling=10.0, timestep_spacing="leading", trained_betas=None)
DDPM_CIFAR10 = dict(_class_name="DDPMScheduler", beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    clip_sample=True, num_train_timesteps=1000, trained_betas=None, variance_type="fixed_small")
LDM_DDIM = dict(_class_name="DDIMScheduler", beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                clip_sample=False, num_train_timesteps=1000, timestep_values=None, trained_betas=None)


def _as(cfg: dict, cls: str, **changes) -> dict:
    return {**cfg, "_class_name": cls, **changes}


SD21_DPM = _as(SD21_DDIM, "DPMSolverMultistepScheduler")
SDXL_EULER_A = _as(SDXL_EULER, "EulerAncestralDiscreteScheduler")

# (id, config, steps): each runs with the config's prediction_type and with the other of epsilon / v_prediction
CASES = [
    ("sd15-pndm", SD15_PNDM, (4, 25)),
    ("pndm-prk", _as(SD15_PNDM, "PNDMScheduler", skip_prk_steps=False), (4, 10)),
    ("pndm-trailing", _as(SD15_PNDM, "PNDMScheduler", timestep_spacing="trailing", set_alpha_to_one=True), (7,)),
    ("sd21-ddim", SD21_DDIM, (25,)),
    ("ldm-ddim", LDM_DDIM, (10,)),
    ("sd21-dpm++", SD21_DPM, (8, 20)),
    ("dpm++-karras-heun", _as(SD21_DPM, SD21_DPM["_class_name"], use_karras_sigmas=True, solver_type="heun"), (12,)),
    ("dpm++-order3-sigma-min", _as(SD21_DPM, SD21_DPM["_class_name"], solver_order=3, final_sigmas_type="sigma_min",
                                   timestep_spacing="trailing"), (10, 20)),
    ("dpm++-order1-leading", _as(SD21_DPM, SD21_DPM["_class_name"], solver_order=1, timestep_spacing="leading"), (9,)),
    ("dpm++-lu-euler-final", _as(SD21_DPM, SD21_DPM["_class_name"], use_lu_lambdas=True, euler_at_final=True,
                                 lower_order_final=False, final_sigmas_type="sigma_min"), (16,)),
    ("dpm++-exponential", _as(SD21_DPM, SD21_DPM["_class_name"], use_exponential_sigmas=True), (10,)),
    ("dpmsolver-order3", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="dpmsolver", solver_order=3,
                             final_sigmas_type="sigma_min"), (12,)),
    ("dpmsolver-heun-cosine", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="dpmsolver", solver_type="heun",
                                  beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"), (10,)),
    ("sde-dpm++-order3", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="sde-dpmsolver++", solver_order=3),
     (10,)),
    ("sde-dpm++-heun", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="sde-dpmsolver++", solver_type="heun",
                           use_karras_sigmas=True), (8,)),
    ("sde-dpmsolver", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="sde-dpmsolver",
                          final_sigmas_type="sigma_min"), (8,)),
    ("sdxl-euler", SDXL_EULER, (25,)),
    ("euler-karras", _as(SDXL_EULER, SDXL_EULER["_class_name"], use_karras_sigmas=True,
                         timestep_spacing="linspace"), (12,)),
    ("sdxl-euler-a", SDXL_EULER_A, (4, 25)),
    ("euler-a-trailing-zero-snr", _as(SDXL_EULER_A, SDXL_EULER_A["_class_name"], timestep_spacing="trailing",
                                      rescale_betas_zero_snr=True), (6,)),
    ("lcm", LCM_DREAMSHAPER, (1, 4, 8)),
    ("lcm-clip", _as(LCM_DREAMSHAPER, "LCMScheduler", clip_sample=True, set_alpha_to_one=False), (6,)),
    ("ddpm-cifar10", DDPM_CIFAR10, (25, 1000)),
    ("ddpm-small-log-cosine", _as(DDPM_CIFAR10, "DDPMScheduler", variance_type="fixed_small_log",
                                  beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), (20,)),
    ("ddpm-large-linspace", _as(DDPM_CIFAR10, "DDPMScheduler", variance_type="fixed_large", clip_sample=False,
                                timestep_spacing="linspace"), (15,)),
    ("ddpm-sigmoid-offset", _as(DDPM_CIFAR10, "DDPMScheduler", beta_schedule="sigmoid", steps_offset=1), (10,)),
]

SAMPLE_CASES = [  # prediction_type "sample", where diffusers' class has it
    ("ddim-sample", _as(LDM_DDIM, "DDIMScheduler", prediction_type="sample"), (10,)),
    ("dpm++-sample", _as(SD21_DPM, SD21_DPM["_class_name"], prediction_type="sample"), (10,)),
    ("dpmsolver-sample", _as(SD21_DPM, SD21_DPM["_class_name"], prediction_type="sample", algorithm_type="dpmsolver",
                             final_sigmas_type="sigma_min"), (10,)),
    ("lcm-sample", _as(LCM_DREAMSHAPER, "LCMScheduler", prediction_type="sample"), (4,)),
    ("ddpm-sample", _as(DDPM_CIFAR10, "DDPMScheduler", prediction_type="sample"), (10,)),
]

NOISE_MODULES = {"DDPMScheduler": "scheduling_ddpm", "LCMScheduler": "scheduling_lcm",
                 "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
                 "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep"}


def fake_model(x: np.ndarray, i: int, channels: int | None = None) -> np.ndarray:
    """A deterministic stand-in for the UNet: bounded, depends on the sample and the step."""
    out = F32(0.9) * np.tanh(F32(0.8) * x + F32(0.05 * i)) + F32(0.1) * np.sin(F32(1.7) * x)
    if channels:  # a learned-variance model: the noise, then the variance (in (0.1, 0.9): a variance or a
        out = np.concatenate([out, F32(0.5) + F32(0.4) * np.cos(x + F32(0.1 * i))], axis=1)  # range fraction)
    return out.astype(F32)


def _rel(ref: np.ndarray, got: np.ndarray, scale: np.ndarray) -> float:
    """Largest |ref - got| / max(1, scale, |ref|), elementwise."""
    scale = np.maximum(np.maximum(1.0, np.abs(ref)), scale)
    return float((np.abs(ref.astype(np.float64) - got) / scale).max())


def walk(cfg: dict, steps: int, monkeypatch, seed: int = 0, out_channels: int | None = None) -> float:
    """Run diffusers' scheduler and ours through a whole trajectory; the largest relative error of any sample."""
    import importlib

    import diffusers

    ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    mine = make_scheduler(cfg)
    assert type(mine) is SCHEDULERS[CLASS_NAMES[cfg["_class_name"]]]
    rng, twin = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    module = NOISE_MODULES.get(cfg["_class_name"])
    draws = []
    if module:
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            draws.append(tuple(shape))
            return torch.from_numpy(twin.standard_normal(tuple(shape)).astype(np.float32))

        monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{module}"), "randn_tensor", randn_tensor)

    ref.set_timesteps(steps)
    got_t = mine.set_timesteps(steps)
    assert got_t.dtype == ref.timesteps.numpy().dtype and got_t.shape == ref.timesteps.shape
    if got_t.dtype.kind == "f" and (cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas")):
        # Euler's fractional timesteps from Karras sigmas: diffusers takes sqrt((1 - abar) / abar) as torch's
        # x ** 0.5 (SLEEF pow, not correctly rounded), numpy its sqrt, and the last bits show through the log
        np.testing.assert_allclose(got_t, ref.timesteps.numpy(), rtol=1e-6)
    else:
        assert np.array_equal(got_t, ref.timesteps.numpy()), (got_t, ref.timesteps)
    assert float(mine.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    noise = np.random.default_rng(seed).standard_normal(SHAPE).astype(F32)
    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    x_mine = noise * F32(mine.init_noise_sigma)
    seen = np.abs(x_ref.numpy())  # elementwise, the largest magnitude so far
    worst = _rel(x_ref.numpy(), x_mine, seen)
    for i, t in enumerate(ref.timesteps):
        in_ref, in_mine = ref.scale_model_input(x_ref, t), mine.scale_model_input(x_mine, i)
        worst = max(worst, _rel(in_ref.numpy(), in_mine, seen))
        out_ref = torch.from_numpy(fake_model(in_ref.numpy(), i, out_channels))
        new_ref = ref.step(out_ref, t, x_ref).prev_sample
        new_mine = mine.step(fake_model(in_mine, i, out_channels), i, x_mine, rng)
        assert new_mine.dtype == np.float32 and new_mine.shape == SHAPE
        assert np.isfinite(new_mine).all() and np.isfinite(new_ref.numpy()).all()
        seen = np.maximum(seen, np.abs(new_ref.numpy()))
        worst = max(worst, _rel(new_ref.numpy(), new_mine, seen))
        x_ref, x_mine = new_ref, new_mine
    # the same number of draws, in the same order, of the same shapes
    assert rng.bit_generator.state == twin.bit_generator.state
    assert all(s == SHAPE for s in draws)
    return worst


def _cases(cases, flip: bool):
    out = []
    for name, cfg, steps in cases:
        pts = [cfg.get("prediction_type", "epsilon")]
        if flip:
            pts.append({"epsilon": "v_prediction"}.get(pts[0], "epsilon"))
        out += [pytest.param({**cfg, "prediction_type": pt}, n, id=f"{name}-{pt}-{n}") for pt in pts for n in steps]
    return out


@pytest.mark.parametrize("cfg, steps", _cases(CASES, flip=True) + _cases(SAMPLE_CASES, flip=False))
def test_trajectory_matches_diffusers(cfg, steps, monkeypatch):
    assert walk(cfg, steps, monkeypatch) <= TOL


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_matches_diffusers(variance_type, monkeypatch):
    cfg = _as(DDPM_CIFAR10, "DDPMScheduler", variance_type=variance_type)
    assert walk(cfg, 12, monkeypatch, out_channels=SHAPE[1]) <= TOL


def test_ddpm_learned_needs_twice_the_channels():
    sched = make_scheduler(_as(DDPM_CIFAR10, "DDPMScheduler", variance_type="learned_range"))
    sched.set_timesteps(4)
    x = np.zeros(SHAPE, F32)
    with pytest.raises(InputError, match="needs a model output of 8 channels"):
        sched.step(x, 0, x, np.random.default_rng(0))


def test_noise_changes_stochastic_steps_and_only_them():
    """Stochastic kinds use the rng (another seed, another sample); deterministic ones ignore it."""
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(F32)
    for kind, cfg in (("euler-a", SDXL_EULER_A), ("lcm", LCM_DREAMSHAPER), ("ddpm", DDPM_CIFAR10),
                      ("dpm++", _as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="sde-dpmsolver++"))):
        a, b = make_scheduler(cfg, kind), make_scheduler(cfg, kind)
        a.set_timesteps(4), b.set_timesteps(4)
        ya = a.step(fake_model(x, 0), 0, x, np.random.default_rng(0))
        yb = b.step(fake_model(x, 0), 0, x, np.random.default_rng(1))
        assert np.abs(ya - yb).max() > 1e-3, kind
        with pytest.raises(TypeError, match=f"scheduler {kind}.* is stochastic: step\\(\\) needs rng"):
            a.step(fake_model(x, 0), 1, x)
    for kind, cfg in (("ddim", SD21_DDIM), ("euler", SDXL_EULER), ("pndm", SD15_PNDM), ("dpm++", SD21_DPM)):
        a = make_scheduler(cfg, kind)
        a.set_timesteps(4)
        rng = np.random.default_rng(0)
        before = rng.bit_generator.state
        ya = a.step(fake_model(x, 0), 0, x, rng)
        assert rng.bit_generator.state == before, kind
        a.set_timesteps(4)
        assert np.array_equal(a.step(fake_model(x, 0), 0, x), ya), kind


@pytest.mark.parametrize("kind, cfg", [("pndm", SD15_PNDM),
                                       ("pndm", _as(SD15_PNDM, "PNDMScheduler", skip_prk_steps=False)),
                                       ("dpm++", _as(SD21_DPM, SD21_DPM["_class_name"], solver_order=3))])
def test_multistep_state_resets_at_step_zero(kind, cfg):
    """The runtime walks the same scheduler once per batch chunk: the second walk must not see the first's history."""
    sched = make_scheduler(cfg, kind)
    timesteps = sched.set_timesteps(6)
    runs = []
    for seed in (0, 0):
        x = np.random.default_rng(seed).standard_normal(SHAPE).astype(F32)
        for i in range(len(timesteps)):
            x = sched.step(fake_model(x, i), i, x)
        runs.append(x)
    assert np.array_equal(runs[0], runs[1])


def test_kinds_and_class_names():
    assert KINDS == ("ddim", "euler", "euler-a", "pndm", "dpm++", "lcm", "ddpm")
    assert set(CLASS_NAMES.values()) == set(KINDS)
    import diffusers

    for cls, kind in CLASS_NAMES.items():
        assert hasattr(diffusers, cls), cls
        sched = make_scheduler({"_class_name": cls})
        assert type(sched) is SCHEDULERS[kind] and sched.name == kind
        # a kind overrides the config's class, as --scheduler does
        assert type(make_scheduler(SD15_PNDM, kind)) is SCHEDULERS[kind]
    assert type(make_scheduler(SD15_PNDM)) is PNDM
    assert type(make_scheduler(SD21_DPM)) is DPMSolverMultistep
    assert type(make_scheduler(LCM_DREAMSHAPER)) is LCM
    assert type(make_scheduler(DDPM_CIFAR10)) is DDPM
    assert type(make_scheduler(SDXL_EULER_A)) is EulerAncestral


def test_unknown_scheduler_class_refused():
    with pytest.raises(InputError) as e:
        make_scheduler({**SD15_PNDM, "_class_name": "HeunDiscreteScheduler"})
    msg = str(e.value)
    assert "'HeunDiscreteScheduler' is not supported by the runtime" in msg and "\n" not in msg
    assert all(cls in msg for cls in CLASS_NAMES)
    with pytest.raises(InputError, match="scheduler config class None is not supported"):
        make_scheduler({"beta_schedule": "linear"})
    with pytest.raises(InputError, match="unknown scheduler 'heun'; the runtime has: ddim, euler, euler-a, pndm, "
                                         "dpm\\+\\+, lcm, ddpm"):
        make_scheduler(SD15_PNDM, "heun")


@pytest.mark.parametrize("kind, changes, match", [
    ("pndm", dict(prediction_type="sample"), "prediction_type 'sample' is not supported by the runtime's pndm"),
    ("euler-a", dict(prediction_type="sample"), "prediction_type 'sample' is not supported by the runtime's euler-a"),
    ("dpm++", dict(prediction_type="flow_prediction"), "prediction_type 'flow_prediction'"),
    ("dpm++", dict(thresholding=True), "DPM-Solver thresholding is not supported"),
    ("dpm++", dict(use_beta_sigmas=True), "use_beta_sigmas needs scipy"),
    ("dpm++", dict(use_flow_sigmas=True), "DPM-Solver use_flow_sigmas is not supported"),
    ("dpm++", dict(use_dynamic_shifting=True), "DPM-Solver use_dynamic_shifting is not supported"),
    ("dpm++", dict(algorithm_type="unipc"), "algorithm_type 'unipc' is not supported"),
    ("dpm++", dict(solver_order=4), "solver_order must be 1, 2 or 3, got 4"),
    ("dpm++", dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
     "sde-dpmsolver has no third-order step"),
    ("dpm++", dict(algorithm_type="dpmsolver"), "final_sigmas_type 'zero' does not work with dpmsolver"),
    ("dpm++", dict(variance_type="learned_range"), "variance_type 'learned_range' is not supported"),
    ("dpm++", dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one of use_karras_sigmas"),
    ("lcm", dict(thresholding=True), "LCM thresholding is not supported"),
    ("lcm", dict(original_inference_steps=2000), "original_inference_steps 2000 exceeds num_train_timesteps 1000"),
    ("ddpm", dict(thresholding=True), "DDPM thresholding is not supported"),
    ("ddpm", dict(variance_type="fixed_large_log"), "variance_type 'fixed_large_log' is not supported"),
    ("ddpm", dict(beta_schedule="cubic"), "beta_schedule 'cubic' is not supported"),
])
def test_unsupported_options_refused(kind, changes, match):
    with pytest.raises(InputError, match=match) as e:
        make_scheduler({**SD21_DDIM, **changes}, kind).set_timesteps(4)
    assert "\n" not in str(e.value)


def test_dpm_keeps_diffusers_fallbacks():
    """diffusers maps a DEIS / UniPC config's algorithm and solver types onto its own; so do we."""
    sched = make_scheduler(_as(SD21_DPM, SD21_DPM["_class_name"], algorithm_type="deis", solver_type="bh2"))
    assert (sched.config["algorithm_type"], sched.config["solver_type"]) == ("dpmsolver++", "midpoint")


@pytest.mark.parametrize("kind, cfg, steps, match", [
    ("lcm", LCM_DREAMSHAPER, 51, "--steps must be in \\[1, 50\\] \\(LCM's original_inference_steps\\), got 51"),
    ("pndm", _as(SD15_PNDM, "PNDMScheduler", skip_prk_steps=False), 3, "--steps must be >= 4 for PNDM's PRK"),
    ("ddpm", DDPM_CIFAR10, 1001, "--steps must be in \\[1, 1000\\], got 1001"),
    ("dpm++", SD21_DPM, 0, "--steps must be in \\[1, 1000\\], got 0"),
])
def test_step_counts_refused(kind, cfg, steps, match):
    with pytest.raises(InputError, match=match):
        make_scheduler(cfg, kind).set_timesteps(steps)
