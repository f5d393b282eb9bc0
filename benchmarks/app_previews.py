"""What app.py's step previews cost, against the step they show, at the full v1.4 size.

    python benchmarks/app_previews.py --size 512 --steps 2

The models have the v1.4 architecture and random weights (bench.py's): speed does not depend on
the values. A run of `inpaint()` times each step (the time between two callbacks); then app.py's
two previews of a step, z_{0|t} and ẑ_{0|t} (the linear map and the PNG data URL), are timed on
that run's own latents. Also: the one-off fit of the preview map at start-up.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]  # app.py at the top level, bench.py beside this file
import app  # noqa: E402
from bench import demo_picture, random_models  # noqa: E402
from ldm_min import Options, inpaint  # noqa: E402
from weights import read_configs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps timed (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    models = random_models(read_configs(), torch.device("cpu"), getattr(torch, args.dtype), compile=False)

    start = time.perf_counter()
    P = app.fit_preview(models)
    fit = time.perf_counter() - start

    ticks, latents = [time.perf_counter()], []

    def step(i, t, z, z0, z0_hat):
        ticks.append(time.perf_counter())
        latents.append((z0, z0_hat))

    inpaint(*demo_picture(args.size), models, Options(steps=args.steps), step)
    steps = [b - a for a, b in zip(ticks[1:], ticks[2:])]  # the first tick's interval holds E(y) and the text
    previews = []
    for z0, z0_hat in latents * 10:
        start = time.perf_counter()
        app.preview(z0, P), app.preview(z0_hat, P)
        previews.append(time.perf_counter() - start)
    step_s, preview_s = statistics.median(steps), statistics.median(previews)
    print(f"{args.size}x{args.size} {args.dtype} on the CPU, {torch.get_num_threads()} threads")
    print(f"preview map fit at start-up: {fit:.2f} s")
    print(f"UNet step (median of {len(steps)}): {step_s:.3f} s")
    print(f"both previews of a step (median of {len(previews)}): {preview_s * 1000:.2f} ms "
          f"= {preview_s / step_s:.2%} of the step")


if __name__ == "__main__":
    main()
