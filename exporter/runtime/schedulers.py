"""DDIM (eta 0) and Euler discrete schedulers in numpy, built from a diffusers scheduler_config.json.

They reproduce diffusers' DDIMScheduler and EulerDiscreteScheduler formulas operation for operation in float32
(betas, alphas_cumprod, timesteps, sigmas, scale_model_input, step), so the torch-free runtime denoises exactly
like the PyTorch pipeline; tests/test_runtime.py checks them against diffusers to 1e-6. Options that would need
torch or scipy, or are stochastic (thresholding, beta sigmas, continuous timesteps, eta > 0), are refused.

Unlike diffusers, step() and scale_model_input() take the step index, not the timestep value: the runtime
always walks the whole schedule from its start.

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


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' cosine ("squaredcos_cap_v2") schedule, in Python floats then float32 like torch.tensor(...)."""

    def alpha_bar(t):
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


def _config(cfg: dict, defaults: dict, name: str) -> dict:
    """diffusers' from_config: the scheduler's own keys, its defaults for keys the config lacks, others ignored."""
    out = {k: cfg.get(k, v) for k, v in defaults.items()}
    if out["prediction_type"] not in ("epsilon", "v_prediction", "sample") + (("original_sample",) if name == "euler" else ()):
        raise InputError(f"scheduler: prediction_type {out['prediction_type']!r} is not supported by the runtime")
    return out


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


class DDIM:
    """diffusers.DDIMScheduler with eta = 0 (deterministic)."""

    name = "ddim"

    def __init__(self, config: dict):
        self.config = cfg = _config(config, DDIM_DEFAULTS, self.name)
        if cfg["thresholding"]:
            raise InputError("scheduler: DDIM thresholding is not supported by the runtime")
        self.betas = _betas(cfg)
        self.alphas = F32(1.0) - self.betas
        self.alphas_cumprod = _cumprod(self.alphas)
        self.final_alpha_cumprod = F32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = None
        self.num_inference_steps = None

    def set_timesteps(self, steps: int) -> np.ndarray:
        n = self.config["num_train_timesteps"]
        if not 1 <= steps <= n:
            raise InputError(f"--steps must be in [1, {n}], got {steps}")
        self.num_inference_steps = steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = n // steps
            t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64)
            t += self.config["steps_offset"]
        elif spacing == "trailing":
            ratio = n / steps
            t = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
        else:
            raise InputError(f"scheduler: timestep_spacing {spacing!r} is not supported")
        self.timesteps = t
        return t

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
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
        self.betas = _betas(cfg)
        self.alphas = F32(1.0) - self.betas
        self.alphas_cumprod = _cumprod(self.alphas)
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

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)

    def _range(self, in_sigmas):
        lo = self.config["sigma_min"] if self.config["sigma_min"] is not None else float(in_sigmas[-1])
        hi = self.config["sigma_max"] if self.config["sigma_max"] is not None else float(in_sigmas[0])
        return lo, hi

    def set_timesteps(self, steps: int) -> np.ndarray:
        cfg = self.config
        n = cfg["num_train_timesteps"]
        if not 1 <= steps <= n:
            raise InputError(f"--steps must be in [1, {n}], got {steps}")
        self.num_inference_steps = steps
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
        sigmas = np.array(((F32(1) - self.alphas_cumprod) / self.alphas_cumprod) ** F32(0.5))
        log_sigmas = np.log(sigmas)
        if cfg["interpolation_type"] == "linear":
            sigmas = np.interp(t, np.arange(0, len(sigmas)), sigmas)
        elif cfg["interpolation_type"] == "log_linear":
            sigmas = np.exp(torch_linspace(np.log(sigmas[-1]), np.log(sigmas[0]), steps + 1))
        else:
            raise InputError(f"scheduler: interpolation_type {cfg['interpolation_type']!r} is not supported")
        if cfg["use_karras_sigmas"]:
            lo, hi = self._range(sigmas)
            ramp = np.linspace(0, 1, steps)
            rho = 7.0
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
            t = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
        elif cfg["use_exponential_sigmas"]:
            lo, hi = self._range(sigmas)
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
            t = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
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

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
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


SCHEDULERS = {"ddim": DDIM, "euler": Euler}
CLASS_NAMES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}


def make_scheduler(config: dict, kind: str | None = None):
    """kind "ddim" | "euler", or None for the config's own class (DDIM where that class is another one)."""
    kind = kind or CLASS_NAMES.get(config.get("_class_name"), "ddim")
    if kind not in SCHEDULERS:
        raise InputError(f"unknown scheduler {kind!r}; the runtime has: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[kind](config)
