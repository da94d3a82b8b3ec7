"""Train the shipped demo: a miniature Stable Diffusion (text-to-image) on scikit-learn's digits.

    python -m tinyprune.demo.train --out exporter/demo/pipeline [--seed 0] [--stages classifier,vae,unet,report]

Data: sklearn's load_digits (1,797 8x8 images, 10 classes), upsampled bilinearly (to 32x32 for the classifier, to
64x64 for the pipeline), quantised to uint8, 3 identical channels, [-1, 1] for the VAE. A fixed stratified 80/20
split (random_state 0) gives 1,437 training and 360 held-out digits; nothing is ever trained on the held-out set.
Captions: the phrasings of tinyprune/demo/captions.py (TRAIN for training, HELDOUT only for evaluation).

Stages (fixed step counts and seeds, so a run reproduces on the same machine and thread count):
  classifier  small CNN on the real 32x32 training digits -> OUT/../classifier/ (config.json + model.safetensors)
              and the held-out digits -> OUT/../digits_eval.npz; its penultimate features are FD's space
  vae         AutoencoderKL 64x64x3 -> 8x8x4 (Stable Diffusion's geometry: downsampling 8, 4 channels), L1
              reconstruction + a small KL; the latent space is then rescaled so that SD's scaling_factor 0.18215
              maps the training latents to unit variance
  unet        a CLIPTokenizer whose BPE vocabulary is learned from the training captions, a CLIPTextModel and a
              UNet2DConditionModel cross-attending to it, trained together from scratch: DDPM epsilon loss on
              scaled latents with min-SNR weighting, 10 % empty captions for classifier-free guidance, shifted
              views, EMA; saved with StableDiffusionPipeline.save_pretrained, a model card, and prompts.txt (the
              training captions, which data-free calibration samples)
  report      dense FD (two seeds) and class accuracy from held-out-phrasing prompts through tinyprune.judge.quality

The unet stage alone reuses OUT/vae. `--minutes` caps the wall time (split over the stages); a stage
that hits its share stops early and says so -- the result is then no longer the reproducible one.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait make a shared (oversubscribed) 2-core machine crawl: measured
# here under load, 20x slower sampling with the default policy. Passive waiting does not change any
# result (same kernels, same reduction order), so it is the default; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RECIPE = {
    "split": {"test_size": 0.2, "random_state": 0},
    "classifier": {"steps": 300, "batch": 128, "lr": 2e-3, "weight_decay": 1e-4, "widths": [32, 64, 64],
                   "feat_dim": 64, "dropout": 0.3},
    "vae": {"steps": 250, "batch": 64, "lr": 1e-3, "kl_weight": 1e-4, "block_out_channels": [16, 32, 64, 64],
            "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4, "image_size": 64,
            "scaling_factor": 0.18215},
    "text": {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128, "max_length": 16},
    "unet": {"steps": 1000, "batch": 128, "lr": 2e-3, "warmup": 50, "ema": 0.995, "caption_dropout": 0.1,
             "block_out_channels": [64, 96], "layers_per_block": 1, "attention_head_dim": 8,
             "norm_num_groups": 32, "beta_schedule": "squaredcos_cap_v2", "shift_px": 4, "min_snr": 5.0},
    "report": {"n_per_class": 20, "steps": 20, "seeds": [0, 1000]},
}
STAGES = ("classifier", "vae", "unet", "report")
STAGE_SHARE = {"classifier": 0.05, "vae": 0.2, "unet": 0.65, "report": 0.1}


# --------------------------------------------------------------------------- logging and data

class Log:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s wall {time.process_time():7.1f}s cpu] {msg}", flush=True)


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, size, size] (bilinear upsampling of the 0..16 images) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (up.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy(), d.target.astype(np.int64)


def split(labels: np.ndarray, test_size: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_size, stratify=labels, random_state=random_state)
    return np.sort(train), np.sort(test)


def to_rgb01(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8.astype(np.float32) / 255.0)[:, None].repeat(1, 3, 1, 1)


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class Budget:
    def __init__(self, minutes: float | None, share: float, log: Log, stage: str):
        self.deadline = None if minutes is None else time.time() + 60.0 * minutes * share
        self.log, self.stage = log, stage

    def over(self, step: int) -> bool:
        if self.deadline is not None and time.time() > self.deadline:
            self.log(f"{self.stage}: wall-time share spent, stopping at step {step} (not the reproducible run)")
            return True
        return False


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- stages

def random_affine(x: torch.Tensor, g: torch.Generator, rot_deg=12.0, scale=0.1, shift=0.1) -> torch.Tensor:
    b = x.shape[0]
    u = torch.rand(b, 4, generator=g) * 2 - 1
    ang = u[:, 0] * math.radians(rot_deg)
    s = 1 + u[:, 1] * scale
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * shift], 1), torch.stack([sin, cos, u[:, 3] * shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_classifier(x_train, y_train, x_test, y_test, cfg, seed, device, log, budget):
    from tinyprune.judge.quality import DigitClassifier

    torch.manual_seed(seed + 1)
    model = DigitClassifier(widths=tuple(cfg["widths"]), feat_dim=cfg["feat_dim"], dropout=cfg["dropout"]).to(device)
    log(f"classifier: {n_params(model):,} params, {cfg['steps']} steps of {cfg['batch']}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    g = torch.Generator().manual_seed(seed + 101)
    n, t0, run = len(x_train), time.time(), 0.0
    model.train()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, n, (cfg["batch"],), generator=g)
        x = random_affine(x_train[idx], g)
        x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], 20))
        loss = F.cross_entropy(model(x.to(device)), y_train[idx].to(device), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if step == 0 else 0.95 * run + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg["steps"]:
            log(f"classifier step {step + 1}/{cfg['steps']} loss {run:.4f} ({time.time() - t0:.0f}s)")
        if budget.over(step + 1):
            break
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x_test[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x_test), 256)])
    acc = float((pred == y_test).float().mean())
    log(f"classifier: held-out accuracy {acc:.4f} ({int((pred == y_test).sum())}/{len(y_test)}), "
        f"{time.time() - t0:.0f}s")
    return model.cpu(), {"loss": run, "test_accuracy": acc, "seconds": time.time() - t0, "params": n_params(model)}


def build_vae(cfg):
    from diffusers import AutoencoderKL

    k = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg["latent_channels"],
        block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
        down_block_types=("DownEncoderBlock2D",) * k, up_block_types=("UpDecoderBlock2D",) * k,
        norm_num_groups=cfg["norm_num_groups"], sample_size=cfg["image_size"], scaling_factor=cfg["scaling_factor"],
    )


@torch.no_grad()
def rescale_latents(vae, k: float) -> None:
    """Multiply the latent space by k without changing what the VAE computes: the posterior's mean by k (its log
    variance by 2 ln k) in quant_conv, the decoder's input by 1/k in post_quant_conv."""
    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k
    q.bias[:c] *= k
    q.bias[c:] += 2.0 * math.log(k)
    pq.weight /= k


def train_vae(x_train, x_test, cfg, seed, device, log, budget):
    torch.manual_seed(seed + 2)
    vae = build_vae(cfg).to(device)
    log(f"vae: {n_params(vae):,} params, {cfg['steps']} steps of {cfg['batch']}, kl weight {cfg['kl_weight']}")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(seed + 102)
    n, t0, run = len(x_train), time.time(), None
    side = cfg["image_size"] // 2 ** (len(cfg["block_out_channels"]) - 1)
    n_lat = cfg["latent_channels"] * side * side
    vae.train()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, n, (cfg["batch"],), generator=g)
        x = (x_train[idx] * 2 - 1).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / n_lat
        loss = l1 + cfg["kl_weight"] * kl
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], 20))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = (l1.item(), kl.item())
        run = cur if run is None else tuple(0.95 * a + 0.05 * b for a, b in zip(run, cur))
        if (step + 1) % 25 == 0 or step + 1 == cfg["steps"]:
            log(f"vae step {step + 1}/{cfg['steps']} l1 {run[0]:.4f} kl/elem {run[1]:.3f} ({time.time() - t0:.0f}s)")
        if budget.over(step + 1):
            break
    vae.eval().requires_grad_(False)
    mean, std = encode(vae, x_train, device)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed + 202))
    raw_std = float(z.std())
    k = 1.0 / (cfg["scaling_factor"] * raw_std)
    rescale_latents(vae, k)
    from tinyprune.judge.quality import psnr

    with torch.inference_mode():
        rec = torch.cat([vae.decode(vae.encode((x_test[i:i + 256] * 2 - 1).to(device)).latent_dist.mean).sample.cpu()
                         for i in range(0, len(x_test), 256)])
    rec_psnr = psnr((rec / 2 + 0.5).clamp(0, 1), x_test)
    log(f"vae: latent std {raw_std:.3f}, rescaled by {k:.3f} for scaling_factor {cfg['scaling_factor']}; "
        f"held-out reconstruction PSNR {rec_psnr:.2f} dB, {time.time() - t0:.0f}s")
    return vae.cpu(), {"l1": run[0], "kl_per_elem": run[1], "latent_std_trained": raw_std, "latent_rescale": k,
                       "scaling_factor": cfg["scaling_factor"], "heldout_psnr_db": rec_psnr,
                       "seconds": time.time() - t0, "params": n_params(vae)}


@torch.inference_mode()
def encode(vae, x01: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(x01), batch):
        post = vae.encode((x01[i:i + batch] * 2 - 1).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def shifted(x01: torch.Tensor, px: int) -> list[torch.Tensor]:
    """The images shifted by every (dy, dx) in {-px, 0, px}^2 (zero fill)."""
    if px <= 0:
        return [x01]
    h, w = x01.shape[-2:]
    pad = F.pad(x01, (px, px, px, px))
    return [pad[..., px + dy:px + dy + h, px + dx:px + dx + w] for dy in (-px, 0, px) for dx in (-px, 0, px)]


# --------------------------------------------------------------------------- the text side

def build_tokenizer(work: Path, max_length: int):
    """The demo's CLIPTokenizer (<|endoftext|> also pads, as in Stable Diffusion 1.x). Any text tokenizes (unknown
    words fall back to bytes); every caption word is one token (checked)."""
    from transformers import CLIPTokenizer

    from tinyprune.demo.bpe import bpe_files
    from tinyprune.demo.captions import training_captions, words

    work.mkdir(parents=True, exist_ok=True)
    for name, text in bpe_files().items():
        (work / name).write_text(text, encoding="utf-8")
    tok = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    for w in sorted(set(words(training_captions()))):
        if len(tok.tokenize(w)) != 1:
            raise SystemExit(f"tokenizer: caption word {w!r} is not one token: {tok.tokenize(w)}")
    return tok


def build_text_encoder(cfg, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], max_position_embeddings=cfg["max_length"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cfg["hidden_size"]))


def build_unet(cfg, context: int, latent_size: int = 8):
    from diffusers import UNet2DConditionModel

    k = len(cfg["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"], down_block_types=("CrossAttnDownBlock2D",) * k,
        up_block_types=("CrossAttnUpBlock2D",) * k, cross_attention_dim=context,
        attention_head_dim=cfg["attention_head_dim"], norm_num_groups=cfg["norm_num_groups"],
    )


def make_scheduler(cfg):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=cfg["beta_schedule"], clip_sample=False, steps_offset=1)


def train_unet(vae, tokenizer, x_train, y_train, cfg, text_cfg, seed, device, log, budget):
    from tinyprune.demo.captions import NAMES, TRAIN, caption

    t0 = time.time()
    views = shifted(x_train, cfg["shift_px"])
    stats = [encode(vae.to(device), v, device) for v in views]
    vae.cpu()
    lat_mean = torch.cat([m for m, _ in stats])
    lat_std = torch.cat([s for _, s in stats])
    labels = y_train.repeat(len(views))
    sf = vae.config.scaling_factor
    log(f"unet: {len(lat_mean)} training latents ({len(views)} views), encoded in {time.time() - t0:.0f}s")

    # every caption (template x digit) and the empty one, tokenized once; row t * 10 + d, the empty one last
    texts = [caption(t, d) for t in TRAIN for d in range(len(NAMES))] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    empty = len(texts) - 1

    torch.manual_seed(seed + 3)
    text_encoder = build_text_encoder(text_cfg, tokenizer).to(device)
    unet = build_unet(cfg, text_cfg["hidden_size"], vae.config.sample_size // 8).to(device)
    scheduler = make_scheduler(cfg)
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    log(f"unet: {n_params(unet):,} params + text encoder {n_params(text_encoder):,} (vocabulary {len(tokenizer)}); "
        f"{cfg['steps']} steps of {cfg['batch']}, lr {cfg['lr']}, ema {cfg['ema']}, {cfg['beta_schedule']}")
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, fused=True)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed + 103)
    n, run = len(lat_mean), None
    unet.train()
    text_encoder.train()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, n, (cfg["batch"],), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg["batch"],), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        row = torch.randint(0, len(TRAIN), (cfg["batch"],), generator=g) * len(NAMES) + labels[idx]
        row[torch.rand(cfg["batch"], generator=g) < cfg["caption_dropout"]] = empty
        rows, inverse = torch.unique(row, return_inverse=True)  # encode each distinct caption of the batch once
        context = text_encoder(ids[rows.to(device)])[0][inverse.to(device)]
        pred = unet(zt.to(device), t.to(device), encoder_hidden_states=context).sample
        per = (pred - noise.to(device)).pow(2).mean(dim=(1, 2, 3))
        if cfg["min_snr"]:  # min-SNR-gamma weighting (Hang et al. 2023), epsilon form
            snr = (a / (1 - a)).view(-1).to(device)
            per = per * snr.clamp(max=cfg["min_snr"]) / snr
        loss = per.mean()
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if (step + 1) % 25 == 0 or step + 1 == cfg["steps"]:
            el = time.time() - t0
            log(f"unet step {step + 1}/{cfg['steps']} loss {run:.4f} ({el:.0f}s, "
                f"{el / (step + 1):.2f}s/step)")
        if budget.over(step + 1):
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    log(f"unet: done in {time.time() - t0:.0f}s, final loss (running) {run:.4f}")
    return unet.cpu(), text_encoder.cpu(), scheduler, {
        "loss": run, "seconds": time.time() - t0, "params": n_params(unet), "text_encoder_params": n_params(text_encoder),
        "vocabulary": len(tokenizer)}


MODEL_CARD = """---
library_name: diffusers
license: mit
pipeline_tag: text-to-image
tags:
- text-to-image
- stable-diffusion
- tinyprune
---

# tinyprune demo: a miniature Stable Diffusion trained on scikit-learn's digits

A StableDiffusionPipeline in every respect but size: CLIPTextModel + CLIPTokenizer (a BPE vocabulary learned from
the captions), UNet2DConditionModel cross-attending to it, AutoencoderKL with Stable Diffusion's latent geometry
(64x64 RGB -> 8x8x4, scaling factor 0.18215), DDIMScheduler. Trained from scratch, on this machine, by
`python -m tinyprune.demo.train` on the 1,437 training digits of `sklearn.datasets.load_digits` (8x8 images
upsampled to 64x64), each captioned by a phrasing such as "a handwritten seven" or "the digit 7".

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("path/to/this/dir")
image = pipe("the digit 3, drawn by hand", num_inference_steps=20, guidance_scale=3.0).images[0]
```

It draws digits only; figures and the recipe: tinyprune's exporter/demo/README.md and training_metrics.json.
"""


def save_demo(out: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """StableDiffusionPipeline.save_pretrained, the model card, and prompts.txt (the training captions). The
    tokenizer's vocab.json and merges.txt go beside its tokenizer.json: transformers before 5 loads CLIPTokenizer
    from them (diffusers' and optimum's ONNX pipelines in an optimum environment, transformers < 4.58)."""
    from diffusers import StableDiffusionPipeline

    from tinyprune.demo.bpe import bpe_files
    from tinyprune.demo.captions import training_captions
    from tinyprune.model.families.text import PROMPTS_FILE

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for name, text in bpe_files().items():
        (out / "tokenizer" / name).write_text(text, encoding="utf-8")
    (out / "README.md").write_text(MODEL_CARD)
    (out / PROMPTS_FILE).write_text("\n".join(training_captions()) + "\n")


# --------------------------------------------------------------------------- main

def _parse_set(items: list[str], recipe: dict) -> dict:
    recipe = json.loads(json.dumps(recipe))
    for item in items:
        key, _, value = item.partition("=")
        stage, _, name = key.partition(".")
        if stage not in recipe or name not in recipe[stage]:
            raise SystemExit(f"--set {item}: unknown recipe key (one of {[f'{s}.{k}' for s in recipe for k in recipe[s]]})")
        try:
            recipe[stage][name] = json.loads(value)
        except json.JSONDecodeError:
            recipe[stage][name] = value
    return recipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyprune.demo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("exporter/demo/pipeline"), help="pipeline dir to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="classifier,vae,unet,report",
                    help=f"comma-separated subset of {','.join(STAGES)} (e.g. 'classifier' alone)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time cap over all stages (breaks reproducibility when hit)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the recorded run used 2)")
    ap.add_argument("--device", default="cpu", help="torch device (the recorded run is on cpu)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override a recipe value (experiments; the shipped demo uses the defaults)")
    ap.add_argument("--metrics", type=Path, default=None, help="also write the training figures as JSON here")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    recipe = _parse_set(args.set, RECIPE)
    torch.set_num_threads(args.threads)
    log = Log()
    out: Path = args.out
    demo_root = out.parent
    device = torch.device(args.device)
    metrics: dict = {"seed": args.seed, "recipe": recipe, "threads": args.threads, "device": str(device),
                     "torch": torch.__version__}
    log(f"demo.train: stages {stages}, seed {args.seed}, {args.threads} threads, device {device}, out {out}")

    small, labels = digits(32)
    big, _ = digits(recipe["vae"]["image_size"])
    tr, te = split(labels, **recipe["split"])
    y_train, y_test = torch.from_numpy(labels[tr]), torch.from_numpy(labels[te])
    log(f"data: {len(tr)} train / {len(te)} held-out digits")

    if "classifier" in stages:
        from tinyprune.judge.quality import EVAL_DATA, save_classifier

        clf, m = train_classifier(to_rgb01(small[tr]), y_train, to_rgb01(small[te]), y_test, recipe["classifier"],
                                  args.seed, device, log, Budget(args.minutes, STAGE_SHARE["classifier"], log,
                                                                 "classifier"))
        save_classifier(clf, demo_root / "classifier", extra={
            "test_accuracy": round(m["test_accuracy"], 6), "trained_on": "sklearn load_digits 32x32, stratified 80/20 "
            f"split random_state {recipe['split']['random_state']}, training part", "seed": args.seed})
        demo_root.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(demo_root / EVAL_DATA, images=small[te], labels=labels[te].astype(np.uint8),
                            index=te.astype(np.int16))
        metrics["classifier"] = m
        log(f"classifier: saved {demo_root / 'classifier'} and {demo_root / EVAL_DATA}")

    x_train, x_test = to_rgb01(big[tr]), to_rgb01(big[te])
    vae = None
    if "vae" in stages:
        vae, m = train_vae(x_train, x_test, recipe["vae"], args.seed, device, log,
                           Budget(args.minutes, STAGE_SHARE["vae"], log, "vae"))
        metrics["vae"] = m
        if "unet" not in stages:
            vae.save_pretrained(out / "vae", safe_serialization=True)
            log(f"vae: saved {out / 'vae'}")

    if "unet" in stages:
        import tempfile

        if vae is None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True, local_files_only=True)
            log(f"unet: reusing {out / 'vae'}")
        with tempfile.TemporaryDirectory() as work:
            tokenizer = build_tokenizer(Path(work), recipe["text"]["max_length"])
        unet, text_encoder, scheduler, m = train_unet(vae, tokenizer, x_train, y_train, recipe["unet"],
                                                      recipe["text"], args.seed, device, log,
                                                      Budget(args.minutes, STAGE_SHARE["unet"], log, "unet"))
        metrics["unet"] = m
        save_demo(out, unet, vae.eval().requires_grad_(False), text_encoder, tokenizer, scheduler)
        log(f"pipeline: saved {out}")

    if "report" in stages:
        metrics["report"] = report(out, demo_root, to_rgb01(small[tr]), recipe["report"], log)

    if args.metrics:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    log("demo.train: done")
    return 0


def report(out: Path, demo_root: Path, x_train: torch.Tensor, cfg: dict, log: Log) -> dict:
    from tinyprune.model.pipeline import load_pipeline
    from tinyprune.judge.quality import EVAL_DATA, evaluate, features, frechet_distance, load_classifier, real_digits

    t0 = time.time()
    clf = load_classifier(demo_root / "classifier")
    real, _ = real_digits(demo_root / EVAL_DATA)
    real_feats = features(clf, real)
    floor = frechet_distance(real_feats, features(clf, x_train))
    log(f"report: FD floor (held-out real vs train real, {len(real)} vs {len(x_train)}) {floor:.3f}")
    pipe = load_pipeline(out)
    runs = {}
    for seed in cfg["seeds"]:
        r = evaluate(pipe, None, n_per_class=cfg["n_per_class"], seed=seed, steps=cfg["steps"], classifier=clf,
                     real_features=real_feats)
        log(f"report: seed {seed}: dense FD {r['dense']['fd']:.3f}, accuracy {r['dense']['accuracy']:.4f} over "
            f"{r['n_samples']} samples (held-out phrasings), {cfg['steps']} DDIM steps ({time.time() - t0:.0f}s)")
        runs[str(seed)] = r
    return {"fd_floor": floor, "seeds": runs, "seconds": time.time() - t0}


if __name__ == "__main__":
    sys.exit(main())
