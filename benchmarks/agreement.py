"""How far a device and dtype are from the golden runs (tests/golden: float32 on the CPU). The
README promises the same picture for the same seed on any device, up to float error; this prints
that error, per golden run: the largest latent difference over all steps, and the pixel
differences of the 8-bit output.

    python benchmarks/agreement.py --device cuda --dtype float32,float16,bfloat16
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from ldm_min import Options, images, inpaint  # noqa: E402
from weights import load_models  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"


def differences(models, expected, run):
    """(max |latent - golden| over all steps, max and mean |pixel - golden|) of one golden run."""
    latents = []
    options = Options(prompt=run["prompt"], guidance=run["guidance"], steps=run["steps"], eta=run["eta"],
                      seed=run["seed"], dilate=run["dilate"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_c's thin stroke warns, as it should
        result = inpaint(images.open_image(GOLDEN / run["image"]), images.open_image(GOLDEN / run["mask"]), models,
                         options, callback=lambda i, t, z, *_: latents.append(z[0].cpu()))
    pixels = np.abs(np.asarray(result, np.int16) - expected[f"{run['name']}.image_uint8"].numpy())
    return (torch.stack(latents) - expected[f"{run['name']}.latents"]).abs().max().item(), pixels.max(), pixels.mean()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes (default %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    expected = load_file(GOLDEN / "expected.safetensors")
    with safe_open(GOLDEN / "expected.safetensors", framework="pt") as f:
        runs = json.loads(f.metadata()["runs"])
    print("| device | dtype | run | max latent diff | max pixel diff | mean pixel diff |\n|---|---|---|---|---|---|")
    for dtype in args.dtype.split(","):
        models = load_models(GOLDEN / "tiny-sd", args.device, dtype)
        for name, run in runs.items():
            latent, pixel_max, pixel_mean = differences(models, expected, {**run, "name": name})
            print(f"| {args.device} | {dtype} | {name} | {latent:.2e} | {pixel_max} | {pixel_mean:.3f} |", flush=True)


if __name__ == "__main__":
    main()
