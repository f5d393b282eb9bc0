"""The paper's speed claim, measured: its method against DDNM on the same image and device.

    python benchmarks/ddnm_speed.py                                   # CPU: reduced steps, scaled up
    python benchmarks/ddnm_speed.py --device cuda                     # GPU: the paper's settings, run whole
    python benchmarks/ddnm_speed.py --weights SD_FOLDER --adm-weights 256x256_diffusion_uncond.pt

The paper: about 3 s an image for its method (30 DDIM steps) against 1 min 40 s for DDNM (hq demo,
T = 25) on an RTX 4080, "about 33 times faster". Both run here on one 512x512 picture with Table 1's
centred 168-pixel hole, through the real code paths (`inpaint()`, `inpaint_ddnm()`), with full-size
models: random weights (speed does not depend on the values) unless files are given.

The paper's method is timed both ways: as ldm_min runs it (one UNet pass a step: no prompt, no
guidance) and as the authors' code ran it (guidance 7.5 on two empty prompts: every step a batch of 2
through the UNet; `table1.authors_inpaint`, with their 167-pixel hole). Their 3 s is the second.

DDNM's cost is its UNet calls: 65 a 256 window at T = 25 (25 steps and hq demo's time travel, jump
length 10, 3 samples), times the windows sampled. The authors' fork samples all 9 windows of a
512 image (585 calls); ldm_min skips those that have no hole left when their turn comes (4 here:
260 calls, the same picture). Both ratios are printed.

--reduced (the default on the CPU, where the ADM takes about 10 s a call): each method runs a few
steps only (the paper's method 2, DDNM 1: one call a window), and the time at the paper's settings
is the measured run plus the missing UNet calls at the mean time of the measured calls after the
first (the first also pays for set-up). The encoder, decoder and everything else are measured, not
scaled. --no-reduced runs the paper's settings whole.

Both ways, so that the ratio is the methods' and not ldm_min's own speed-ups: `plain`, both models
as built, and `as loaded`, both with the CPU speed-ups that ldm_min/fast.py applies after loading
(the SD UNet's and the ADM's alike). On a CPU it then times one call of each UNet plain against as
loaded, alternating, best of --repeat: the SD UNet at 64x64 latents, the ADM at 256 px.
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import demo_picture, randomize, random_models, speed_ups, sync  # noqa: E402
from ldm_min import Options, ddnm, fast, images, inpaint  # noqa: E402
from ldm_min.adm import ADM  # noqa: E402
from ldm_min.options import DdnmOptions  # noqa: E402
from table1 import authors_inpaint, hole_mask  # noqa: E402
from versus import best_of  # noqa: E402
from weights import adm_config, load_adm, load_models, pick_device, read_configs  # noqa: E402

ADM_KEYS = ROOT / "tests" / "adm256_uncond_keys.tsv"  # every tensor of 256x256_diffusion_uncond.pt, with its shape
PAPER_SECONDS = {"paper": 3.0, "ddnm": 100.0}  # the paper, RTX 4080: about 3 s and 1 min 40 s an image
AUTHORS = "paper, the authors' batch of 2"  # the paper's method as their code ran it: 2 images a UNet call
REDUCED_STEPS = {"paper": 2, "ddnm": 1}
SIDES = ("plain", "as loaded")  # both models as built, and both with the CPU speed-ups


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (float16 on cuda, float32 on cpu), float32, float16, bfloat16")
    p.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                   help="run a few steps and scale by the UNet calls (default: on the CPU only)")
    p.add_argument("--repeat", type=int, default=3, help="on a CPU, rounds of the plain against as loaded UNet "
                                                         "calls; the best counts (default %(default)s)")
    p.add_argument("--weights", help="a Stable Diffusion v1.4 checkpoint instead of random weights")
    p.add_argument("--adm-weights", help="256x256_diffusion_uncond.pt instead of random weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return p.parse_args(argv)


def random_adm(device, dtype):
    """The full 552M-parameter ADM in the official file's layout, random weights, in `dtype`, with the
    loader's last step (fast.speed_up_adm)."""
    rows = [line.split("\t") for line in ADM_KEYS.read_text().splitlines() if not line.startswith("#")]
    with torch.device("meta"):
        model = ADM(adm_config({name: json.loads(shape) for name, shape in rows}, ADM_KEYS))
    torch.manual_seed(0)
    return fast.speed_up_adm(randomize(model.to(dtype).to_empty(device=device)))


def sd_models(args, device, dtype):
    return (load_models(args.weights, args.device, args.dtype) if args.weights
            else random_models(read_configs(), device, dtype, compile=False))


def adm_model(args, device, dtype):
    return load_adm(args.adm_weights, args.device, args.dtype) if args.adm_weights else random_adm(device, dtype)


def timed_forward(module, device):
    """Wrap module.forward; returns the list its calls' seconds go to."""
    seconds, forward = [], module.forward

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    module.forward = timed
    return seconds


def measure(run, calls_full, seconds, device):
    """(seconds at the paper's settings, seconds measured, calls made, mean s a call after the first)."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    measured, made = time.perf_counter() - start, len(seconds)
    per_call = statistics.mean(seconds[1:] or seconds)
    return measured + (calls_full - made) * per_call, measured, made, per_call


def both_methods(args, device, dtype, reduced):
    """method -> (seconds at the paper's settings, seconds measured, calls made, s a call), and the
    UNet calls at the paper's settings, for the models loaded now (see `speed_ups`)."""
    image, mask = demo_picture(512)[0], hole_mask(168)
    x, hole = images.prepare(image, mask)
    paper = Options()  # the paper's settings: 30 steps, eta 0.85, no prompt
    models = sd_models(args, device, dtype)
    unet_seconds = timed_forward(models.unet, device)
    steps = REDUCED_STEPS["paper"] if reduced else paper.steps
    rows = {"paper": measure(lambda: inpaint(image, mask, models, Options(steps=steps)), paper.steps,
                             unet_seconds, device)}
    unet_seconds.clear()
    crop = np.asarray(image.convert("RGB"))
    rows[AUTHORS] = measure(lambda: authors_inpaint([crop], [168], [torch.Generator()], models, steps), paper.steps,
                            unet_seconds, device)
    del models
    gc.collect()  # the timed forward closes a cycle through the UNet: free it before the ADM loads

    settings = DdnmOptions()  # hq demo's, T = 25
    model = adm_model(args, device, dtype)
    adm_seconds = timed_forward(model, device)
    calls, every = ddnm.unet_calls(hole, settings)
    steps = REDUCED_STEPS["ddnm"] if reduced else settings.steps
    rows["ddnm"] = measure(lambda: ddnm.inpaint_ddnm(x, hole, model, DdnmOptions(steps=steps)), calls, adm_seconds,
                           device)
    # The fork samples every window: the same run plus the skipped windows' calls.
    rows["ddnm, all 9 windows (the fork)"] = (rows["ddnm"][0] + (every - calls) * rows["ddnm"][3], *rows["ddnm"][1:])
    del model
    gc.collect()
    return rows, {"paper": paper.steps, AUTHORS: paper.steps, "ddnm": calls, "ddnm, all 9 windows (the fork)": every}


def unet_calls_both_ways(args, device, dtype):
    """On a CPU: name -> {side: best seconds} of one call of each UNet, plain against as loaded,
    alternating in one process (the first call of each, which packs the weights, not counted)."""
    generator = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 64, 64, generator=generator), torch.rand(1, 3, 256, 256, generator=generator) * 2 - 1
    best = {}
    for name, load in (("SD UNet, 64x64 latents", sd_models), ("ADM, 256 px", adm_model)):
        sides = {}
        for side in SIDES:
            with speed_ups(side == "as loaded"):
                sides[side] = load(args, device, dtype)
        if name.startswith("SD"):
            context = sides["plain"].encode_text("")
            calls = {side: (lambda m=m: m.unet(z.to(dtype), torch.tensor(500), context)) for side, m in sides.items()}
        else:
            calls = {side: (lambda m=m: m(x.to(dtype), torch.tensor([500]))) for side, m in sides.items()}
        best_of(calls, 1, device)
        best[name] = best_of(calls, args.repeat, device)
        del sides, calls
        gc.collect()
    return best



@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device, dtype = pick_device(args.device, args.dtype)
    reduced = device.type == "cpu" if args.reduced is None else args.reduced
    sides = SIDES if device.type == "cpu" else SIDES[1:]  # fast.py's speed-ups are the CPU's
    runs = {}
    for side in sides:
        with speed_ups(side == "as loaded"):
            runs[side] = both_methods(args, device, dtype, reduced)
    calls = unet_calls_both_ways(args, device, dtype) if device.type == "cpu" else {}

    where = f"{device.type} {str(dtype).removeprefix('torch.')}" + (
        f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    result = {"device": where, "reduced": reduced, "sides": {}, "unet_calls": calls}
    for side, (rows, full_calls) in runs.items():
        ours = rows["paper"][0]
        result["sides"][side] = {"methods": {
            name: {"unet_calls": full_calls[name], "seconds": total, "measured_seconds": measured,
                   "measured_calls": made, "seconds_per_call": per} for name, (total, measured, made, per) in rows.items()},
            "ratio": {name: total / ours for name, (total, *_) in rows.items() if name != "paper"},
            "ratio_to_the_authors": {name: total / rows[AUTHORS][0] for name, (total, *_) in rows.items()
                                     if name.startswith("ddnm")}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{where}; {'reduced steps, scaled by the UNet calls' if reduced else 'the paper settings, run whole'}")
    print("| models | method | UNet calls | s per call | s an image | x the paper's method | x the authors' batch of 2 |"
          "\n|---|---|---|---|---|---|---|")
    for side, (rows, full_calls) in runs.items():
        ours, theirs = rows["paper"][0], rows[AUTHORS][0]
        for name, (total, measured, made, per) in rows.items():
            print(f"| {side} | {name} | {full_calls[name]} | {per:.3f} | {total:.1f} | {total / ours:.1f} | "
                  f"{total / theirs:.1f} |")
    print(f"the paper (RTX 4080): {PAPER_SECONDS['paper']:.0f} s and {PAPER_SECONDS['ddnm']:.0f} s, "
          f"{PAPER_SECONDS['ddnm'] / PAPER_SECONDS['paper']:.0f}x")
    if calls:
        print(f"\none call, plain against as loaded, alternating, best of {args.repeat}:")
        print("| UNet | plain | as loaded | as loaded / plain |\n|---|---|---|---|")
        for name, t in calls.items():
            print(f"| {name} | {t['plain']:.3f} s | {t['as loaded']:.3f} s | {t['as loaded'] / t['plain']:.2f} |")


if __name__ == "__main__":
    main()
