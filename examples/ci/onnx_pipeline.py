"""CI step: run a bundle in the ecosystem's ONNX pipeline as it stands, the way a user of the artifact would.

    python examples/ci/onnx_pipeline.py BUNDLE [--prompt "a red bicycle"] [--steps 10] [--out image.png]

Loads BUNDLE with diffusers' OnnxStableDiffusionPipeline (the class its model_index.json names; onnxruntime on
the CPU), makes one image and fails (exit 1) when it is not finite. Bundles of families diffusers has no ONNX
pipeline for (SDXL and LCM: optimum's ORT pipelines; the unconditional families) are skipped with a line
saying so (exit 0); run them with the bundle's torch-free runtime (`python -m tinyprune.runtime BUNDLE`) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DIFFUSERS_ONNX = "OnnxStableDiffusionPipeline"
VAE_SCALE = 8  # diffusers' ONNX pipeline sizes its latents as height // 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", default="a red bicycle")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the image here (PNG)")
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a tinyprune bundle (no manifest.json)", file=sys.stderr)
        return 2
    index_path = args.bundle / "model_index.json"
    cls = json.loads(index_path.read_text()).get("_class_name") if index_path.is_file() else None
    if cls != DIFFUSERS_ONNX:
        print(f"onnx-pipeline: skipped: {args.bundle} is {'a ' + cls if cls else 'not an ecosystem ONNX'} "
              f"bundle; diffusers' ONNX pipeline runs {DIFFUSERS_ONNX} bundles only")
        return 0

    import numpy as np
    from diffusers import OnnxStableDiffusionPipeline

    pipe = OnnxStableDiffusionPipeline.from_pretrained(args.bundle, provider="CPUExecutionProvider",
                                                       local_files_only=True)
    unet = json.loads((args.bundle / "unet" / "config.json").read_text())
    size = int(unet["sample_size"]) * VAE_SCALE
    image = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps,
                 generator=np.random.RandomState(args.seed), output_type="np").images
    if not np.isfinite(image).all():
        print(f"error: {DIFFUSERS_ONNX} made a non-finite image from {args.bundle}", file=sys.stderr)
        return 1
    if args.out:
        from PIL import Image

        Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(args.out)
    print(f"onnx-pipeline: {DIFFUSERS_ONNX} ran {args.bundle}: image {image.shape[2]}x{image.shape[1]}, "
          f"{args.steps} steps" + (f", written to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
