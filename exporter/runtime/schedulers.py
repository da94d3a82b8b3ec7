"""diffusers' schedulers in numpy, built from a diffusers scheduler_config.json.

DDIM (eta 0), Euler, Euler ancestral, PNDM (PLMS, with or without its PRK warm-up), DPM-Solver multistep
(dpmsolver++ / dpmsolver and their SDE variants, orders 1-3), LCM and DDPM reproduce diffusers' DDIMScheduler,
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler, DPMSolverMultistepScheduler, LCMScheduler
and DDPMScheduler operation for operation in float32 (betas, alphas_cumprod, timesteps, sigmas,
scale_model_input, step), so the torch-free runtime denoises exactly like the PyTorch pipeline;
tests/test_runtime.py checks single steps and tests/test_runtime_schedulers.py whole trajectories against
diffusers. Options that would need torch or scipy (thresholding, beta sigmas), belong to other model families
(flow sigmas, DPM-Solver's learned variances) or have no noise input in diffusers' step (DDIM eta > 0, Euler
s_churn) are refused, one line each.

Unlike diffusers, step() and scale_model_input() take the step index, not the timestep value: the runtime
always walks the whole schedule from its start, and set_timesteps() or a step at index 0 resets the
multistep state (PNDM, DPM-Solver). Stochastic steps (euler-a, lcm, ddpm, DPM-Solver's sde-* variants) draw
their noise as rng.standard_normal(shape).astype(float32) from the numpy Generator passed as step(..., rng),
in diffusers' order (one draw per step where diffusers calls randn_tensor); the others ignore rng.

Depends on numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

F32 = np.float32


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) bit for bit: float32 step, filled from both ends."""
    if steps == 1:
        return np.array([start], dtype=F32)
    start32, end32 = F32(start), F32(end)
    step = np.float64((end32 - start32) / F32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    # torch's kernel uses fused multiply-adds: one rounding of start + step * i, emulated in float64
    lo = np.float64(start32) + step * idx[:half]
    hi = np.float64(end32) - step * (steps - idx[half:] - 1)
    return np.concatenate([lo, hi]).astype(F32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on CPU accumulates float32 in float64 (its acc_type): so do we."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999, transform: str = "cosine") -> np.ndarray:
    """diffusers' cosine ("squaredcos_cap_v2") or laplace schedule, in Python floats then float32 like torch.tensor."""

    def alpha_bar(t):
        if transform == "laplace":
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas = F32(1.0) - betas
    abar_sqrt = np.sqrt(_cumprod(alphas))
    a0, aT = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = abar_sqrt - aT
    abar_sqrt = abar_sqrt * (a0 / (a0 - aT))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[0:1], abar[1:] / abar[:-1]])
    return (F32(1) - alphas).astype(F32)


def _betas(cfg: dict) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise InputError(f"scheduler: beta_schedule {cfg['beta_schedule']!r} is not supported by the runtime")
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


# the prediction types each diffusers class steps with (it raises on the others)
PREDICTIONS = {"euler": ("epsilon", "v_prediction", "sample", "original_sample"),
               "euler-a": ("epsilon", "v_prediction"), "pndm": ("epsilon", "v_prediction")}


def _alphas(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """betas, alphas = 1 - betas and their cumulative product, as every discrete scheduler derives them."""
    alphas = F32(1.0) - betas
    return betas, alphas, _cumprod(alphas)


def _final_alpha(cfg: dict, alphas_cumprod: np.ndarray):
    """The cumulative alpha past the last step: 1 with set_alpha_to_one, else the first one (DDIM, PNDM, LCM)."""
    return F32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]


def _config(cfg: dict, defaults: dict, name: str) -> dict:
    """diffusers' from_config: the scheduler's own keys, its defaults for keys the config lacks, others ignored."""
    out = {k: cfg.get(k, v) for k, v in defaults.items()}
    if out["prediction_type"] not in PREDICTIONS.get(name, ("epsilon", "v_prediction", "sample")):
        raise InputError(f"scheduler: prediction_type {out['prediction_type']!r} is not supported by the runtime's "
                         f"{name}")
    return out


def _refuse(cfg: dict, name: str, *keys: str) -> None:
    for key in keys:
        if cfg[key]:
            raise InputError(f"scheduler: {name} {key} is not supported by the runtime")


def _check_steps(steps: int, most: int, why: str = "") -> None:
    if not 1 <= steps <= most:
        raise InputError(f"--steps must be in [1, {most}]{why}, got {steps}")


def _noise(rng, shape, name: str) -> np.ndarray:
    """A step's noise as diffusers' randn_tensor would add it, drawn from the caller's numpy Generator."""
    if rng is None:
        raise TypeError(f"scheduler {name} is stochastic: step() needs rng, a numpy Generator")
    return rng.standard_normal(shape).astype(F32)


def _int_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """DDIM's and DDPM's integer timesteps for timestep_spacing, descending."""
    n = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = n // steps
        t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64)
        t += cfg["steps_offset"]
    elif spacing == "trailing":
        ratio = n / steps
        t = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    else:
        raise InputError(f"scheduler: timestep_spacing {spacing!r} is not supported")
    return t


def _float_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """The Euler schedulers' float32 timesteps for timestep_spacing, descending."""
    n = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = n // steps
        t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
        t += cfg["steps_offset"]
    elif spacing == "trailing":
        ratio = n / steps
        t = (np.arange(n, 0, -ratio)).round().copy().astype(np.float32)
        t -= 1
    else:
        raise InputError(f"scheduler: timestep_spacing {spacing!r} is not supported")
    return t


def _exp(x):
    """float32 exp, rounded from float64 (scalar or array). torch's float32 exp is all but correctly rounded and
    numpy's is a few ulp off; DPM-Solver's steps at a large sigma cancel terms a thousand times the sample, so
    one ulp of exp(h) shows up in the fourth digit of the result."""
    out = np.exp(np.asarray(x, dtype=np.float64)).astype(F32)
    return out if out.ndim else out[()]


def _log(x):
    """float32 log, rounded from float64, like _exp; log(0) = -inf (DPM-Solver's lambda at a final sigma of 0)."""
    with np.errstate(divide="ignore"):
        out = np.log(np.asarray(x, dtype=np.float64)).astype(F32)
    return out if out.ndim else out[()]


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' _sigma_to_t: sigma's fractional timestep, interpolated in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(lo: float, hi: float, steps: int) -> np.ndarray:
    """Karras et al.'s rho = 7 sigmas from hi down to lo, in float64 like diffusers."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return np.array(((F32(1) - alphas_cumprod) / alphas_cumprod) ** F32(0.5))


DDIM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon", "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

EULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
    "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}

EULER_A_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

PNDM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
    "timestep_spacing": "leading", "steps_offset": 0,
}

DPM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
    "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "use_flow_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
    "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}

LCM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
    "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
    "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
}

DDPM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


class DDIM:
    """diffusers.DDIMScheduler with eta = 0 (deterministic)."""

    name = "ddim"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, DDIM_DEFAULTS, self.name)
        if cfg["thresholding"]:
            raise InputError("scheduler: DDIM thresholding is not supported by the runtime")
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        self.final_alpha_cumprod = _final_alpha(cfg, self.alphas_cumprod)
        self.init_noise_sigma, self.timesteps = 1.0, None
        self.num_inference_steps = None

    def set_timesteps(self, steps: int) -> np.ndarray:
        _check_steps(steps, self.config["num_train_timesteps"])
        self.num_inference_steps = steps
        self.timesteps = _int_timesteps(self.config, steps)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[index])
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(1) - a_t
        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - b_t ** F32(0.5) * model_output) / a_t ** F32(0.5)
            eps = model_output
        elif cfg["prediction_type"] == "sample":
            x0 = model_output
            eps = (sample - a_t ** F32(0.5) * x0) / b_t ** F32(0.5)
        else:  # v_prediction
            x0 = (a_t ** F32(0.5)) * sample - (b_t ** F32(0.5)) * model_output
            eps = (a_t ** F32(0.5)) * model_output + (b_t ** F32(0.5)) * sample
        if cfg["clip_sample"]:
            r = cfg["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        # eta = 0: std_dev_t = 0, so the direction term is sqrt(1 - a_prev) * eps
        direction = (F32(1) - a_prev - F32(0)) ** F32(0.5) * eps
        return (a_prev ** F32(0.5) * x0 + direction).astype(F32, copy=False)


class Euler:
    """diffusers.EulerDiscreteScheduler with s_churn = 0 (deterministic)."""

    name = "euler"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, EULER_DEFAULTS, self.name)
        if cfg["use_beta_sigmas"]:
            raise InputError("scheduler: use_beta_sigmas needs scipy and is not supported by the runtime")
        if cfg["timestep_type"] != "discrete":
            raise InputError("scheduler: continuous timesteps are not supported by the runtime")
        if sum(bool(cfg[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas")) > 1:
            raise InputError("scheduler: only one of use_karras_sigmas, use_exponential_sigmas can be set")
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = (((F32(1) - self.alphas_cumprod) / self.alphas_cumprod) ** F32(0.5))[::-1]
        self.sigmas = np.concatenate([sigmas, np.zeros(1, F32)])
        self.timesteps = None
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    _sigma_to_t = staticmethod(_sigma_to_t)

    def _range(self, in_sigmas):
        lo = self.config["sigma_min"] if self.config["sigma_min"] is not None else float(in_sigmas[-1])
        hi = self.config["sigma_max"] if self.config["sigma_max"] is not None else float(in_sigmas[0])
        return lo, hi

    def set_timesteps(self, steps: int) -> np.ndarray:
        cfg = self.config
        _check_steps(steps, cfg["num_train_timesteps"])
        self.num_inference_steps = steps
        t = _float_timesteps(cfg, steps)
        sigmas = _train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        if cfg["interpolation_type"] == "linear":
            sigmas = np.interp(t, np.arange(0, len(sigmas)), sigmas)
        elif cfg["interpolation_type"] == "log_linear":
            sigmas = np.exp(torch_linspace(np.log(sigmas[-1]), np.log(sigmas[0]), steps + 1))
        else:
            raise InputError(f"scheduler: interpolation_type {cfg['interpolation_type']!r} is not supported")
        if cfg["use_karras_sigmas"]:
            lo, hi = self._range(sigmas)
            sigmas = _karras(lo, hi, steps)
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        elif cfg["use_exponential_sigmas"]:
            lo, hi = self._range(sigmas)
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if cfg["final_sigmas_type"] == "sigma_min":
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        elif cfg["final_sigmas_type"] == "zero":
            last = 0
        else:
            raise InputError(f"scheduler: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = t.astype(np.float32)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = self.sigmas[index]
        return sample / ((sigma**2 + 1) ** F32(0.5))

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        sample = sample.astype(F32, copy=False)
        sigma = self.sigmas[index]
        sigma_hat = sigma * F32(0.0 + 1)
        pt = self.config["prediction_type"]
        if pt in ("original_sample", "sample"):
            x0 = model_output
        elif pt == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** F32(0.5)) + (sample / (sigma**2 + 1))
        derivative = (sample - x0) / sigma_hat
        dt = self.sigmas[index + 1] - sigma_hat
        return (sample + derivative * dt).astype(model_output.dtype, copy=False)


class EulerAncestral:
    """diffusers.EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then noise back up by sigma_up."""

    name = "euler-a"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, EULER_A_DEFAULTS, self.name)
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        self.sigmas = np.concatenate([_train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(F32)
        self.timesteps = None
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma * max_sigma + F32(1)) ** F32(0.5)

    def set_timesteps(self, steps: int) -> np.ndarray:
        _check_steps(steps, self.config["num_train_timesteps"])
        self.num_inference_steps = steps
        t = _float_timesteps(self.config, steps)
        sigmas = _train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(t, np.arange(0, len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = t
        return t

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = self.sigmas[index]
        return sample / ((sigma * sigma + F32(1)) ** F32(0.5))

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        sample = sample.astype(F32, copy=False)
        sigma = self.sigmas[index]
        if self.config["prediction_type"] == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma * sigma + F32(1)) ** F32(0.5)) + (sample / (sigma * sigma + F32(1)))
        sigma_from, sigma_to = sigma, self.sigmas[index + 1]
        sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                    / (sigma_from * sigma_from)) ** F32(0.5)
        sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up) ** F32(0.5)
        derivative = (sample - x0) / sigma
        dt = sigma_down - sigma
        prev = sample + derivative * dt
        prev = prev + _noise(rng, model_output.shape, self.name) * sigma_up
        return prev.astype(model_output.dtype, copy=False)


class PNDM:
    """diffusers.PNDMScheduler: PLMS (linear multistep) steps, after 12 PRK (Runge-Kutta) ones unless skip_prk_steps.

    Stable Diffusion 1.x ships skip_prk_steps=True: one extra UNet call, the second step redoing the first with
    the average of two noise estimates."""

    name = "pndm"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, PNDM_DEFAULTS, self.name)
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        self.final_alpha_cumprod = _final_alpha(cfg, self.alphas_cumprod)
        self.init_noise_sigma, self.timesteps = 1.0, None
        self.prk_timesteps = np.array([], dtype=np.int64)
        self.num_inference_steps = None
        self._reset()

    def _reset(self):
        self.ets, self.cur_sample, self.cur_model_output = [], None, 0

    def set_timesteps(self, steps: int) -> np.ndarray:
        cfg = self.config
        n = cfg["num_train_timesteps"]
        _check_steps(steps, n)
        prk = not cfg["skip_prk_steps"]
        if prk and steps < 4:
            raise InputError(f"--steps must be >= 4 for PNDM's PRK warm-up (skip_prk_steps is false), got {steps}")
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, steps) * (n // steps)).round() + cfg["steps_offset"]
        elif spacing == "trailing":
            t = np.round(np.arange(n, 0, -(n / steps)))[::-1].astype(np.int64) - 1
        else:
            raise InputError(f"scheduler: timestep_spacing {spacing!r} is not supported")
        if prk:
            prk_t = np.array(t[-4:]).repeat(2) + np.tile(np.array([0, n // steps // 2]), 4)
            self.prk_timesteps = prk_t[:-1].repeat(2)[1:-1][::-1].copy()
            plms = t[:-3][::-1].copy()
        else:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy()
        self.num_inference_steps = steps
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset()
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        if index == 0:
            self._reset()
        if index < len(self.prk_timesteps):
            return self._step_prk(model_output, index, sample)
        return self._step_plms(model_output, index, sample)

    def _step_prk(self, model_output, index, sample):
        n = self.config["num_train_timesteps"]
        diff_to_prev = 0 if index % 2 else n // self.num_inference_steps // 2
        prev_t = int(self.timesteps[index]) - diff_to_prev
        t = int(self.prk_timesteps[index // 4 * 4])
        if index % 4 == 0:
            self.cur_model_output = self.cur_model_output + F32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif index % 4 in (1, 2):
            self.cur_model_output = self.cur_model_output + F32(1 / 3) * model_output
        else:
            model_output = self.cur_model_output + F32(1 / 6) * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(cur_sample, t, prev_t, model_output)

    def _step_plms(self, model_output, index, sample):
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        t = int(self.timesteps[index])
        prev_t = t - ratio
        if index != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # skip_prk_steps: redo the first step (t + ratio -> t) with the mean of both noise estimates
            prev_t, t = t, t + ratio
        ets = self.ets
        if len(ets) == 1 and index == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and index == 1:
            model_output = (model_output + ets[-1]) / F32(2)
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (F32(3) * ets[-1] - ets[-2]) / F32(2)
        elif len(ets) == 3:
            model_output = (F32(23) * ets[-1] - F32(16) * ets[-2] + F32(5) * ets[-3]) / F32(12)
        else:
            model_output = F32(1 / 24) * (F32(55) * ets[-1] - F32(59) * ets[-2] + F32(37) * ets[-3] - F32(9) * ets[-4])
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample, t, prev_t, model_output):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = (a_t ** F32(0.5)) * model_output + (b_t ** F32(0.5)) * sample
        sample_coeff = (a_prev / a_t) ** F32(0.5)
        denom = a_t * b_prev ** F32(0.5) + (a_t * b_t * a_prev) ** F32(0.5)
        return (sample_coeff * sample - (a_prev - a_t) * model_output / denom).astype(F32, copy=False)


DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


class DPMSolverMultistep:
    """diffusers.DPMSolverMultistepScheduler: DPM-Solver(++) multistep, orders 1-3, and its SDE variants."""

    name = "dpm++"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, DPM_DEFAULTS, self.name)
        # diffusers' own fallbacks, for a config made for DEIS or UniPC
        if cfg["algorithm_type"] == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        algorithm = cfg["algorithm_type"]
        if algorithm not in DPM_ALGORITHMS:
            raise InputError(f"scheduler: DPM-Solver algorithm_type {algorithm!r} is not supported by the runtime")
        if cfg["solver_type"] not in ("midpoint", "heun"):
            raise InputError(f"scheduler: DPM-Solver solver_type {cfg['solver_type']!r} is not supported")
        if cfg["solver_order"] not in (1, 2, 3):
            raise InputError(f"scheduler: DPM-Solver solver_order must be 1, 2 or 3, got {cfg['solver_order']}")
        if algorithm == "sde-dpmsolver" and cfg["solver_order"] == 3:
            raise InputError("scheduler: sde-dpmsolver has no third-order step in diffusers: use solver_order 1 or 2")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise InputError(f"scheduler: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
        if cfg["final_sigmas_type"] == "zero" and algorithm in ("dpmsolver", "sde-dpmsolver"):
            raise InputError(f"scheduler: final_sigmas_type 'zero' does not work with {algorithm}: use sigma_min")
        if cfg["use_beta_sigmas"]:
            raise InputError("scheduler: use_beta_sigmas needs scipy and is not supported by the runtime")
        if cfg["variance_type"] in ("learned", "learned_range"):
            raise InputError(f"scheduler: DPM-Solver variance_type {cfg['variance_type']!r} is not supported")
        _refuse(cfg, "DPM-Solver", "thresholding", "use_flow_sigmas", "use_dynamic_shifting")
        if sum(bool(cfg[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas")) > 1:
            raise InputError("scheduler: only one of use_karras_sigmas, use_exponential_sigmas can be set")
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        self.lambda_t = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(F32(1) - self.alphas_cumprod))
        self.sigmas = _train_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.timesteps = None
        self.num_inference_steps = None
        self._reset()

    def _reset(self):
        self.model_outputs = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, steps: int) -> np.ndarray:
        cfg = self.config
        n = cfg["num_train_timesteps"]
        _check_steps(steps, n)
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], cfg["lambda_min_clipped"]))
        last_timestep = n - clipped_idx
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last_timestep // (steps + 1)
            t = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            t += cfg["steps_offset"]
        elif spacing == "trailing":
            ratio = n / steps
            t = np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1
        else:
            raise InputError(f"scheduler: timestep_spacing {spacing!r} is not supported")
        sigmas = _train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        rounded = cfg["beta_schedule"] != "squaredcos_cap_v2"
        if cfg["use_karras_sigmas"]:
            sigmas = np.flip(sigmas).copy()
            sigmas = _karras(sigmas[-1].item(), sigmas[0].item(), steps)
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            t = t.round() if rounded else t
        elif cfg["use_lu_lambdas"]:
            lambdas = np.flip(log_sigmas.copy())
            lo, hi = lambdas[-1].item(), lambdas[0].item()
            sigmas = np.exp(hi + np.linspace(0, 1, steps) * (lo - hi))  # rho = 1
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            t = t.round() if rounded else t
        elif cfg["use_exponential_sigmas"]:
            sigmas = np.flip(sigmas).copy()
            sigmas = np.exp(np.linspace(math.log(sigmas[0].item()), math.log(sigmas[-1].item()), steps))
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        else:
            sigmas = np.interp(t, np.arange(0, len(sigmas)), sigmas)
        if cfg["final_sigmas_type"] == "sigma_min":
            last = ((F32(1) - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** F32(0.5)
        else:
            last = 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = t.astype(np.int64)
        self.num_inference_steps = len(t)
        self._reset()
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    @staticmethod
    def _alpha_sigma(sigma):
        alpha_t = F32(1) / ((sigma * sigma + F32(1)) ** F32(0.5))
        return alpha_t, sigma * alpha_t

    def _als(self, index):
        """alpha, sigma and lambda = log(alpha / sigma) at self.sigmas[index]."""
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        return alpha, sigma, _log(alpha) - _log(sigma)

    def _convert(self, model_output, index, sample):
        """The model output as the solver's quantity: x0 for dpmsolver++, the noise for dpmsolver."""
        pt = self.config["prediction_type"]
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        if self.config["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            if pt == "epsilon":
                return (sample - sigma_t * model_output) / alpha_t
            if pt == "sample":
                return model_output
            return alpha_t * sample - sigma_t * model_output
        if pt == "epsilon":
            return model_output
        if pt == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        cfg = self.config
        if index == 0:
            self._reset()
        n = len(self.timesteps)
        lower_order_final = index == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero")
        lower_order_second = index == n - 2 and cfg["lower_order_final"] and n < 15
        x = self._convert(model_output, index, sample)
        self.model_outputs = self.model_outputs[1:] + [x]
        sample = sample.astype(F32, copy=False)
        algorithm = cfg["algorithm_type"]
        noise = _noise(rng, x.shape, f"dpm++ ({algorithm})") if algorithm.startswith("sde-") else None
        order = cfg["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev = self._first_order(x, index, sample, noise)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev = self._second_order(index, sample, noise)
        else:
            prev = self._third_order(index, sample, noise)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        return prev.astype(model_output.dtype, copy=False)

    def _first_order(self, m, index, sample, noise):
        one, two = F32(1), F32(2)
        alpha_t, sigma_t, lambda_t = self._als(index + 1)
        alpha_s, sigma_s, lambda_s = self._als(index)
        h = lambda_t - lambda_s
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (_exp(-h) - one)) * m
        if algorithm == "dpmsolver":
            return (alpha_t / alpha_s) * sample - (sigma_t * (_exp(h) - one)) * m
        if algorithm == "sde-dpmsolver++":
            return ((sigma_t / sigma_s * _exp(-h)) * sample + (alpha_t * (one - _exp(-two * h))) * m
                    + sigma_t * np.sqrt(one - _exp(-two * h)) * noise)
        return ((alpha_t / alpha_s) * sample - two * (sigma_t * (_exp(h) - one)) * m
                + sigma_t * np.sqrt(_exp(two * h) - one) * noise)

    def _second_order(self, index, sample, noise):
        one, two, half = F32(1), F32(2), F32(0.5)
        alpha_t, sigma_t, lambda_t = self._als(index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._als(index)
        _, _, lambda_s1 = self._als(index - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (one / r0) * (m0 - m1)
        algorithm, heun = self.config["algorithm_type"], self.config["solver_type"] == "heun"
        if algorithm == "dpmsolver++":
            x = (sigma_t / sigma_s0) * sample - (alpha_t * (_exp(-h) - one)) * D0
            if heun:
                return x + (alpha_t * ((_exp(-h) - one) / h + one)) * D1
            return x - half * (alpha_t * (_exp(-h) - one)) * D1
        if algorithm == "dpmsolver":
            x = (alpha_t / alpha_s0) * sample - (sigma_t * (_exp(h) - one)) * D0
            if heun:
                return x - (sigma_t * ((_exp(h) - one) / h - one)) * D1
            return x - half * (sigma_t * (_exp(h) - one)) * D1
        if algorithm == "sde-dpmsolver++":
            x = (sigma_t / sigma_s0 * _exp(-h)) * sample + (alpha_t * (one - _exp(-two * h))) * D0
            if heun:
                x = x + (alpha_t * ((one - _exp(-two * h)) / (-two * h) + one)) * D1
            else:
                x = x + half * (alpha_t * (one - _exp(-two * h))) * D1
            return x + sigma_t * np.sqrt(one - _exp(-two * h)) * noise
        x = (alpha_t / alpha_s0) * sample - two * (sigma_t * (_exp(h) - one)) * D0
        if heun:
            x = x - two * (sigma_t * ((_exp(h) - one) / h - one)) * D1
        else:
            x = x - (sigma_t * (_exp(h) - one)) * D1
        return x + sigma_t * np.sqrt(_exp(two * h) - one) * noise

    def _third_order(self, index, sample, noise):
        one, two, half = F32(1), F32(2), F32(0.5)
        alpha_t, sigma_t, lambda_t = self._als(index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._als(index)
        _, _, lambda_s1 = self._als(index - 1)
        _, _, lambda_s2 = self._als(index - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (one / (r0 + r1)) * (D1_0 - D1_1)
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (_exp(-h) - one)) * D0
                    + (alpha_t * ((_exp(-h) - one) / h + one)) * D1
                    - (alpha_t * ((_exp(-h) - one + h) / (h * h) - half)) * D2)
        if algorithm == "dpmsolver":
            return ((alpha_t / alpha_s0) * sample - (sigma_t * (_exp(h) - one)) * D0
                    - (sigma_t * ((_exp(h) - one) / h - one)) * D1
                    - (sigma_t * ((_exp(h) - one - h) / (h * h) - half)) * D2)
        return ((sigma_t / sigma_s0 * _exp(-h)) * sample + (alpha_t * (one - _exp(-two * h))) * D0
                + (alpha_t * ((one - _exp(-two * h)) / (-two * h) + one)) * D1
                + (alpha_t * ((one - _exp(-two * h) - two * h) / ((two * h) * (two * h)) - half)) * D2
                + sigma_t * np.sqrt(one - _exp(-two * h)) * noise)


class LCM:
    """diffusers.LCMScheduler: a latent consistency model's few-step sampling, fresh noise between steps."""

    name = "lcm"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, LCM_DEFAULTS, self.name)
        if cfg["thresholding"]:
            raise InputError("scheduler: LCM thresholding is not supported by the runtime")
        self.betas, self.alphas, self.alphas_cumprod = _alphas(_betas(cfg))
        self.final_alpha_cumprod = _final_alpha(cfg, self.alphas_cumprod)
        self.init_noise_sigma, self.timesteps = 1.0, None
        self.num_inference_steps = None

    def set_timesteps(self, steps: int) -> np.ndarray:
        n, original = self.config["num_train_timesteps"], self.config["original_inference_steps"]
        if original > n:
            raise InputError(f"scheduler: LCM original_inference_steps {original} exceeds num_train_timesteps {n}")
        _check_steps(steps, original, " (LCM's original_inference_steps)")
        k = n // original
        origin = (np.asarray(list(range(1, original + 1))) * k - 1)[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[indices].astype(np.int64)
        self.num_inference_steps = steps
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[index])
        prev_t = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        # boundary-condition scalings, sigma_data 0.5, in float32 as diffusers gets them from a timestep tensor
        scaled = F32(t) * F32(cfg["timestep_scaling"])
        c_skip = F32(0.25) / (scaled * scaled + F32(0.25))
        c_out = scaled / (scaled * scaled + F32(0.25)) ** F32(0.5)
        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif cfg["prediction_type"] == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        if cfg["clip_sample"]:
            r = cfg["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        denoised = c_out * x0 + c_skip * sample
        if index != self.num_inference_steps - 1:
            noise = _noise(rng, model_output.shape, self.name)
            return (np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * noise).astype(F32, copy=False)
        return denoised.astype(F32, copy=False)


DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class DDPM:
    """diffusers.DDPMScheduler: ancestral sampling, x_{t-1} from the posterior mean plus its (or a learned) variance."""

    name = "ddpm"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, DDPM_DEFAULTS, self.name)
        if cfg["thresholding"]:
            raise InputError("scheduler: DDPM thresholding is not supported by the runtime")
        if cfg["variance_type"] == "fixed_large_log":
            raise InputError("scheduler: DDPM variance_type 'fixed_large_log' is not supported (diffusers' step "
                             "takes the square root of its log: NaN)")
        if cfg["variance_type"] not in DDPM_VARIANCES:
            raise InputError(f"scheduler: DDPM variance_type {cfg['variance_type']!r} is not supported by the runtime")
        n = cfg["num_train_timesteps"]
        if cfg["trained_betas"] is None and cfg["beta_schedule"] == "sigmoid":
            x = torch_linspace(-6, 6, n)
            betas = F32(1) / (F32(1) + _exp(-x)) * F32(cfg["beta_end"] - cfg["beta_start"]) + F32(cfg["beta_start"])
            betas = _rescale_zero_terminal_snr(betas) if cfg["rescale_betas_zero_snr"] else betas
        elif cfg["trained_betas"] is None and cfg["beta_schedule"] == "laplace":
            betas = _betas_for_alpha_bar(n, transform="laplace")
            betas = _rescale_zero_terminal_snr(betas) if cfg["rescale_betas_zero_snr"] else betas
        else:
            betas = _betas(cfg)
        self.betas, self.alphas, self.alphas_cumprod = _alphas(betas)
        self.one = F32(1.0)
        self.init_noise_sigma = 1.0
        self.timesteps = None
        self.num_inference_steps = None

    def set_timesteps(self, steps: int) -> np.ndarray:
        _check_steps(steps, self.config["num_train_timesteps"])
        self.num_inference_steps = steps
        self.timesteps = _int_timesteps(self.config, steps)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def _variance(self, t, prev_t, predicted_variance):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = F32(1) - a_t / a_prev
        variance = np.maximum((F32(1) - a_prev) / (F32(1) - a_t) * current_beta_t, F32(1e-20))
        kind = self.config["variance_type"]
        if kind == "fixed_small_log":
            return _exp(F32(0.5) * _log(variance))
        if kind == "fixed_large":
            return current_beta_t
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            min_log, max_log = _log(variance), _log(current_beta_t)
            frac = (predicted_variance + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        return variance

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng=None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[index])
        prev_t = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1
        kind = cfg["variance_type"]
        predicted_variance = None
        if kind in ("learned", "learned_range"):
            c = sample.shape[1]
            if model_output.shape[1] != 2 * c:
                raise InputError(f"scheduler: DDPM variance_type {kind!r} needs a model output of {2 * c} channels "
                                 f"(noise and variance), got {model_output.shape[1]}")
            model_output, predicted_variance = model_output[:, :c], model_output[:, c:]
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        current_alpha_t = a_t / a_prev
        current_beta_t = F32(1) - current_alpha_t
        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - b_t ** F32(0.5) * model_output) / a_t ** F32(0.5)
        elif cfg["prediction_type"] == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = (a_t ** F32(0.5)) * sample - (b_t ** F32(0.5)) * model_output
        if cfg["clip_sample"]:
            r = cfg["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        x0_coeff = (a_prev ** F32(0.5) * current_beta_t) / b_t
        sample_coeff = current_alpha_t ** F32(0.5) * b_prev / b_t
        prev = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            noise = _noise(rng, model_output.shape, self.name)
            variance = self._variance(t, prev_t, predicted_variance)
            if kind == "fixed_small_log":
                prev = prev + variance * noise
            elif kind == "learned_range":
                prev = prev + _exp(F32(0.5) * variance) * noise
            else:
                prev = prev + (variance ** F32(0.5)) * noise
        return prev.astype(F32, copy=False)


SCHEDULERS = {"ddim": DDIM, "euler": Euler, "euler-a": EulerAncestral, "pndm": PNDM, "dpm++": DPMSolverMultistep,
              "lcm": LCM, "ddpm": DDPM}
KINDS = tuple(SCHEDULERS)
CLASS_NAMES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-a",
               "PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpm++", "LCMScheduler": "lcm",
               "DDPMScheduler": "ddpm"}


def make_scheduler(config: dict, kind: str | None = None):
    """kind one of KINDS, or None for the config's own class (its _class_name; refused if the runtime lacks it)."""
    if not kind:
        cls = config.get("_class_name")
        if cls not in CLASS_NAMES:
            raise InputError(f"scheduler config class {cls!r} is not supported by the runtime; it has: "
                             f"{', '.join(CLASS_NAMES)}")
        kind = CLASS_NAMES[cls]
    if kind not in SCHEDULERS:
        raise InputError(f"unknown scheduler {kind!r}; the runtime has: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[kind](config)
