"""How fast, how big and how exact ldm_min's inpainting path is at the full v1.4 size.

    python benchmarks/bench.py --size 512 --dtype bfloat16 --steps 2
    python benchmarks/bench.py --device cuda --dtype float16 --steps 30 --prompt "a red boat" --compile --json
    python benchmarks/bench.py --weights FOLDER --plain     # the same without the CPU speed-ups
    python benchmarks/bench.py --dtype bfloat16 --warmup 1 --warmup-size 256   # after a picture of another size
    python benchmarks/bench.py --diffusers                  # diffusers' inpainting pipeline, for its memory

The models have the v1.4 architecture and random weights: speed does not depend on the values, so
nothing is downloaded (`--weights FOLDER` loads a checkpoint instead, to measure loading too). The
timed run is the real code path, `ldm_min.pipeline.inpaint`, with its parts wrapped in timers. It
prints, per part: seconds, TFLOP/s achieved, and that rate as a fraction of what this machine does
on a plain matmul and a plain 3x3 convolution in the same dtype, measured in the same run. Also: the
peak memory of the run (with --plain, that of the plain path, which the CPU speed-ups of
ldm_min/fast.py must not pass; with --diffusers, that of diffusers' pipeline on the same run and
weights, which ldm_min's must not pass either), and how far the UNet's output in bfloat16/float16
is from float32 on the same input and weights.
"""
import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from ldm_min import Options, fast, inpaint  # noqa: E402
from weights import (assemble, build, checkpoint_configs, load_models, pick_device, read_configs,  # noqa: E402
                     resolve)

# The real CLIP BPE vocabulary, kept with the test checkpoint: token ids only pick embedding rows,
# so any valid ids time the same.
TOKENIZER = ROOT / "tests" / "golden" / "tiny-sd" / "tokenizer"
PARTS = ("text", "vae_encode", "unet", "vae_decode")
PAPER_STEPS = Options().steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=2,
                   help=f"DDIM steps timed (default 2, so a CPU run ends); the {PAPER_STEPS}-step time "
                        f"(the paper's) is extrapolated")
    p.add_argument("--prompt", default="", help="a prompt turns on guidance, which doubles the UNet batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA only)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed 1-step runs first (default: 1 on CUDA, where kernels are picked or "
                        "compiled on the first call; 0 on the CPU, where a run is long)")
    p.add_argument("--warmup-size", type=int, default=None,
                   help="the warm-up runs' picture side (default --size): a run after one of another size, as in "
                        "the page or a folder of pictures")
    p.add_argument("--weights", help="load this checkpoint (folder or single file) instead of random weights")
    p.add_argument("--plain", action="store_true",
                   help="none of the CPU speed-ups of ldm_min/fast.py, to compare peak memory with the plain path's "
                        "(per-part speed: benchmarks/versus.py)")
    p.add_argument("--diffusers", action="store_true",
                   help="the same run through diffusers' StableDiffusionInpaintPipeline on the same random weights, "
                        "for its time and peak memory (diffusers is not a dependency: a throwaway environment's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    args.warmup_size = args.size if args.warmup_size is None else args.warmup_size
    if args.compile and args.device != "cuda":
        p.error("--compile is for CUDA only")
    if args.diffusers and (args.weights or args.compile or args.plain):
        p.error("--diffusers runs random weights, eagerly: not with --weights, --compile or --plain")
    if args.size <= 0 or args.size % 8:
        p.error("--size must be a positive multiple of 8")
    if args.warmup_size <= 0:
        p.error("--warmup-size must be positive")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def randomize(module):
    """Random values of a sensible scale, so the low-precision error is measured on realistic
    activations: weights ~ N(0, 1/fan_in), norm scales 1, biases 0."""
    module.requires_grad_(False)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5)
        elif name.endswith("weight"):  # the only 1-d weights are GroupNorm/LayerNorm scales
            p.fill_(1)
        else:
            p.zero_()
    return module.eval()


def random_models(configs, device, dtype, compile):
    """The v1.4 parts with random weights, made directly in the compute dtype: no float32 copy
    ever exists, so peak memory is that of a real run. Then the loader's own last step."""
    from transformers import CLIPTokenizer

    with torch.device("meta"):
        modules = build(configs)
    torch.manual_seed(0)
    modules = {part: randomize(m.to(dtype).to_empty(device=device)) for part, m in modules.items()}
    return assemble(modules, CLIPTokenizer.from_pretrained(TOKENIZER), configs, device, dtype, compile)


@contextlib.contextmanager
def speed_ups(on):
    """Models loaded inside are as ldm_min loads them (on), or plain: none of fast.py's CPU speed-ups."""
    can_pack = fast.can_pack
    if not on:
        fast.can_pack = lambda dtype: False  # what the loaders ask before they pack anything
    try:
        yield
    finally:
        fast.can_pack = can_pack


class Timed:
    """Stands in for a callable and records the seconds of each call."""

    def __init__(self, f, device):
        self.f, self.device, self.seconds = f, device, []

    def __call__(self, *args, **kwargs):
        sync(self.device)  # on CUDA, time the work, not its launch
        start = time.perf_counter()
        out = self.f(*args, **kwargs)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out


def demo_picture(size):
    """A smooth picture with a square hole in the middle: content does not change the speed."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(rgb.astype(np.uint8)), Image.fromarray(mask)


def count_flops(configs, dtype, size, batch):
    """FLOPs of one call of each part, counted once on `meta` tensors: the same shapes as the
    run, no arithmetic done, nothing allocated. A multiply-add counts as 2 FLOPs."""
    with torch.device("meta"):
        unet, vae, text = (m.to(dtype) for m in build(configs).values())
        h = size // 8
        calls = {
            "text": lambda: text(torch.zeros(1, 77, dtype=torch.long)),
            "vae_encode": lambda: vae.encode(torch.zeros(1, 3, size, size, dtype=dtype)),
            "unet": lambda: unet(torch.zeros(batch, 4, h, h, dtype=dtype), 500,
                                 torch.zeros(batch, 77, configs["unet"]["cross_attention_dim"], dtype=dtype)),
            "vae_decode": lambda: vae.decode(torch.zeros(1, 4, h, h, dtype=dtype)),
        }
        flops = {}
        for part, call in calls.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                call()
            flops[part] = counter.get_total_flops()
    return flops


def median_seconds(f, device, repeats=5):
    f()  # the first call picks kernels and allocates
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        f()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_peaks(device, dtype):
    """What this machine reaches in this dtype on a plain square matmul and on a 3x3 convolution
    shaped like the UNet's widest-resolution ones (320 -> 320 channels, 64x64, batch 2), in the
    faster of the two memory formats. The UNet's rates are read as a fraction of these."""
    n = 4096 if device.type == "cuda" else 2048  # big enough to saturate, small enough to be quick
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    matmul = 2 * n**3 / median_seconds(lambda: a @ b, device)
    x = torch.randn(2, 320, 64, 64, device=device).to(dtype)
    w = torch.randn(320, 320, 3, 3, device=device).to(dtype)
    conv_flops = 2 * x.shape[0] * 320 * 320 * 9 * 64 * 64
    conv = max(conv_flops / median_seconds(lambda: F.conv2d(x, w, padding=1), device),
               conv_flops / median_seconds(lambda: F.conv2d(x.to(memory_format=torch.channels_last),
                                                           w.to(memory_format=torch.channels_last), padding=1),
                                           device))
    return {"matmul": matmul / 1e12, "conv3x3": conv / 1e12}


@torch.no_grad()
def low_precision_error(models, configs, size, prompt):
    """Relative error ||eps_low - eps_32|| / ||eps_32|| of one UNet call, on the same input and the
    same (low-precision-rounded) weights; only the arithmetic differs. The float32 UNet is a plain
    one, built here: the sped-up modules cannot be cast."""
    unet = models.unet.f if isinstance(models.unet, Timed) else models.unet
    unet = getattr(unet, "_orig_mod", unet)  # the compiled module's own weights
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(models.device)
    context = models.encode_text(prompt)
    low = unet(z.to(models.dtype), 500, context).float()
    with torch.device("meta"):
        reference = build(configs)["unet"]
    reference.load_state_dict({k: v.float() for k, v in unet.state_dict().items()}, assign=True)
    ref = reference(z, 500, context.float())
    return ((low - ref).norm() / ref.norm()).item(), (low - ref).abs().max().item()


@torch.no_grad()
def diffusers_run(models, configs, args):
    """Time and peak memory of diffusers' inpainting pipeline on the same picture, hole, steps, prompt
    and (shared, not copied) random weights as ldm_min's run; printed as ldm_min's are."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    parts = {}
    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        with torch.device("meta"):
            parts[part] = cls(**{k: v for k, v in configs[part].items() if not k.startswith("_")})
        parts[part].load_state_dict(getattr(models, part).state_dict(), assign=True)
        setattr(models, part, None)  # ldm_min's modules go: only the shared weights stay
    pipe = StableDiffusionInpaintPipeline(
        **parts, text_encoder=models.text_encoder, tokenizer=models.tokenizer, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
        scheduler=DDIMScheduler.from_config({k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}))
    image, mask = demo_picture(args.size)
    start = time.perf_counter()
    # guidance 1 without a prompt: one UNet pass a step, as ldm_min's
    pipe(args.prompt, image=image, mask_image=mask, height=args.size, width=args.size, strength=1.0, eta=Options().eta,
         num_inference_steps=args.steps, guidance_scale=Options().guidance if args.prompt else 1.0, output_type="np")
    sync(models.device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if models.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"diffusers' StableDiffusionInpaintPipeline, {args.size}x{args.size}, {args.device} {args.dtype}, "
          f"{args.steps} steps: {total:.1f} s; peak {'memory' if models.device.type == 'cuda' else 'RSS'} "
          f"{peak / 2**30:.2f} GiB")


def main(argv=None):
    args = parse_args(argv)
    device, dtype = pick_device(args.device, args.dtype)
    if args.plain or args.diffusers:
        fast.can_pack = lambda dtype: False  # before loading, which asks it
    # The architecture measured: the checkpoint's (its folder or hub cache), else v1.4's.
    configs = checkpoint_configs(resolve(args.weights, dtype)) if args.weights else read_configs()
    start = time.perf_counter()
    if args.weights:
        models = load_models(args.weights, args.device, args.dtype, args.compile)
    else:
        models = random_models(configs, device, dtype, args.compile)
    load_seconds = time.perf_counter() - start
    if args.diffusers:
        return diffusers_run(models, configs, args)
    packed = [part for part in ("unet", "vae")
              if any(isinstance(m, fast.PackedConv2d) for m in getattr(models, part).modules())]
    weight_bytes = sum(p.numel() * p.element_size()
                       for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())
    # region "full": the model runs at the picture's size (the default, "auto", would inpaint a crop of a large one).
    pictures = {size: demo_picture(size) for size in (args.size, args.warmup_size)}
    run = lambda steps, size: inpaint(*pictures[size], models, Options(prompt=args.prompt, steps=steps, region="full"))
    for _ in range(args.warmup if args.warmup is not None else int(device.type == "cuda")):
        run(1, args.warmup_size)

    # The timed run: the real path, each part timed where sample()/inpaint() call it.
    models.encode_text = Timed(models.encode_text, device)
    models.vae.encode = Timed(models.vae.encode, device)
    models.vae.decode = Timed(models.vae.decode, device)
    models.unet = Timed(models.unet, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    run(args.steps, args.size)
    sync(device)
    total = time.perf_counter() - start
    # The CPU time this process got, per thread and second: well under 1 means other processes
    # took cores during the run, and its timings (not its FLOP counts) are inflated.
    cpu_share = (time.process_time() - cpu_start) / total / torch.get_num_threads()
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    timers = {"text": models.encode_text, "vae_encode": models.vae.encode, "unet": models.unet,
              "vae_decode": models.vae.decode}
    seconds = {part: sum(t.seconds) for part, t in timers.items()}
    # The first call also sets up kernels (a one-off, counted in the total): steps scale the others.
    unet_call = statistics.median(models.unet.seconds[1:] or models.unet.seconds)
    other = total - sum(seconds.values())  # image preparation, the sampler's own arithmetic
    # encode_text runs once for "" and once more for a prompt; the rest once, the UNet once a step.
    guided = bool(args.prompt)
    text_calls = 1 + guided
    flops = count_flops(configs, dtype, args.size, 1 + guided)
    peaks = machine_peaks(device, dtype)

    parts = {}
    for part in PARTS:
        per_call = unet_call if part == "unet" else seconds[part] / (text_calls if part == "text" else 1)
        tflops = flops[part] / per_call / 1e12
        parts[part] = {"seconds": seconds[part], "seconds_per_call": per_call, "gflop_per_call": flops[part] / 1e9,
                       "tflops": tflops, "of_matmul": tflops / peaks["matmul"], "of_conv3x3": tflops / peaks["conv3x3"]}
    extrapolated = total + (PAPER_STEPS - args.steps) * unet_call  # only the UNet part scales with steps
    result = {
        "device": str(device), "dtype": args.dtype, "size": args.size, "steps": args.steps, "guided": guided,
        "unet_batch": 1 + guided, "compiled": args.compile, "packed": packed, "threads": torch.get_num_threads(),
        "cpu_share": cpu_share, "load_seconds": load_seconds, "total_seconds": total, "other_seconds": other,
        "extrapolated_steps": PAPER_STEPS, "extrapolated_seconds": extrapolated, "parts": parts, "machine_tflops": peaks,
        "weights_gib": weight_bytes / 2**30, "peak_memory_gib": peak_bytes / 2**30,
        "peak_memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)",
    }
    if dtype != torch.float32:  # after the timed run: the float32 UNet must not count in its peak
        result["unet_rel_error_vs_float32"], result["unet_max_abs_error_vs_float32"] = \
            low_precision_error(models, configs, args.size, args.prompt)

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.size}x{args.size}, {device.type} {args.dtype}, {args.steps} steps, UNet batch {1 + guided}"
          f"{', compiled' if args.compile else ''}, packed convolutions: {' and '.join(packed) or 'none'}, "
          f"{torch.get_num_threads()} threads")
    if device.type == "cpu":
        busy = " (other processes took cores: the times are inflated)" if cpu_share < 0.9 else ""
        print(f"CPU share during the run: {cpu_share:.0%} of {torch.get_num_threads()} threads{busy}")
    print(f"machine: matmul {peaks['matmul']:.3f} TFLOP/s, 3x3 conv {peaks['conv3x3']:.3f} TFLOP/s")
    print(f"{'part':<11}{'s total':>9}{'s/call':>9}{'GFLOP/call':>12}{'TFLOP/s':>9}{'/matmul':>9}{'/conv':>7}")
    for part, r in parts.items():
        print(f"{part:<11}{r['seconds']:9.2f}{r['seconds_per_call']:9.2f}{r['gflop_per_call']:12.1f}"
              f"{r['tflops']:9.3f}{r['of_matmul']:9.0%}{r['of_conv3x3']:7.0%}")
    print(f"other      {other:9.2f}   (image preparation, sampler arithmetic)")
    print(f"total {total:.1f} s for {args.steps} steps; {PAPER_STEPS} steps extrapolated: {extrapolated:.1f} s "
          f"(+ {PAPER_STEPS - args.steps} x {unet_call:.2f} s UNet calls)")
    print(f"{'weights loaded' if args.weights else 'random weights made'} in {load_seconds:.1f} s; "
          f"weights {result['weights_gib']:.2f} GiB, {result['peak_memory_kind']} {result['peak_memory_gib']:.2f} GiB")
    if "unet_rel_error_vs_float32" in result:
        print(f"UNet {args.dtype} vs float32, same input and weights: relative error "
              f"{result['unet_rel_error_vs_float32']:.2e}, max abs {result['unet_max_abs_error_vs_float32']:.2e}")


if __name__ == "__main__":
    main()
