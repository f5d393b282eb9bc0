"""Images per second when many images are inpainted N at a time (`inpaint.py photos/ masks/ --batch N`,
`table1.py --batch N`): the same path, `ldm_min.pipeline.inpaint_batch`.

    python benchmarks/throughput.py --device cuda --dtype float16 --batches 1,4,8,16 [--compile]
    python benchmarks/throughput.py --weights tests/golden/tiny-sd --size 128 --batches 1,4 --images 8

The models have the v1.4 architecture and random weights unless --weights (as bench.py). For each N,
--images copies of bench.py's demo picture, a seed each, go through inpaint_batch N at a time, after
one untimed 1-step batch of N (kernels picked, weights packed, or the UNet compiled for that batch
size). Printed per N: images per second, seconds per batch, and on CUDA the peak memory allocated.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from bench import demo_picture, random_models, sync  # noqa: E402
from ldm_min import Options, images  # noqa: E402
from ldm_min.pipeline import inpaint_batch  # noqa: E402
from weights import load_models, pick_device, read_configs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4", help="the batch sizes N to time, separated by commas (default 1,4)")
    p.add_argument("--images", type=int, default=16, help="images inpainted for each N (default 16)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--steps", type=int, default=Options().steps, help="DDIM steps (default %(default)s)")
    p.add_argument("--prompt", default="", help="a prompt turns on guidance, which doubles the UNet batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--weights", help="load this checkpoint instead of random weights")
    args = p.parse_args(argv)
    args.batches = [int(n) for n in args.batches.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = pick_device(args.device, args.dtype)
    if args.weights:
        models = load_models(args.weights, args.device, args.dtype, args.compile)
    else:
        models = random_models(read_configs(), device, dtype, args.compile)
    x, hole = images.prepare(*demo_picture(args.size))
    pictures = lambda n, steps: [(x, hole, Options(prompt=args.prompt, steps=steps, seed=k, region="full"))
                                 for k in range(n)]
    print(f"{args.size}x{args.size}, {device.type} {args.dtype}, {args.steps} steps, "
          f"{'guided' if args.prompt else 'no prompt'}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads, {args.images} images per N")
    print(f"{'N':>3}{'images/s':>10}{'s/batch':>9}{'peak GiB':>10}")
    for n in args.batches:
        inpaint_batch(pictures(n, 1), models)  # the untimed warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        todo = pictures(args.images, args.steps)
        for i in range(0, len(todo), n):
            inpaint_batch(todo[i:i + n], models)
        sync(device)
        seconds = time.perf_counter() - start
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:10.2f}" if device.type == "cuda" else f"{'-':>10}"
        print(f"{n:3d}{args.images / seconds:10.3f}{seconds / -(-args.images // n):9.2f}{peak}", flush=True)


if __name__ == "__main__":
    main()
