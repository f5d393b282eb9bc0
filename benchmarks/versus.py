"""ldm_min against diffusers, the implementation people would otherwise use: each part timed in
one process, on the same random v1.4-size weights and the same inputs, alternating, best of N.

    python benchmarks/versus.py --dtype float32,bfloat16 --repeat 3
    python benchmarks/versus.py --device cuda --dtype float16 --repeat 20

diffusers is never a dependency of ldm_min: install it in a throwaway virtual environment (beside
this project's requirements) to get the comparison. Without it, only ldm_min's figures print.
Compare only figures from one run: machines, and the load on one machine, differ.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import PAPER_STEPS, random_models, sync  # noqa: E402
from weights import read_configs  # noqa: E402


def diffusers_twins(models):
    """diffusers' UNet and VAE holding the same weights as `models` (ldm_min's module names are
    diffusers' tensor names), or None when diffusers is not installed."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        return None
    configs, twins = read_configs(), []
    for cls, part, ours in ((UNet2DConditionModel, "unet", models.unet), (AutoencoderKL, "vae", models.vae)):
        config = {k: v for k, v in configs[part].items() if not k.startswith("_")}
        with torch.device("meta"):
            theirs = cls(**config)
        theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
        twins.append(theirs.requires_grad_(False).eval())
    return twins


def parts(models, twins, size):
    """name -> (ldm_min's call, diffusers' call or None): the same input to both."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(models.device, models.dtype)
    z = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(models.device, models.dtype)
    context = models.encode_text("")
    t = torch.tensor(500, device=models.device)
    unet, vae = twins or (None, None)
    return {
        "UNet step": (lambda: models.unet(z, t, context),
                      unet and (lambda: unet(z, t, encoder_hidden_states=context).sample)),
        "VAE encode": (lambda: models.vae.encode(x), vae and (lambda: vae.encode(x).latent_dist.mean)),
        "VAE decode": (lambda: models.vae.decode(z), vae and (lambda: vae.decode(z / models.vae.scaling_factor).sample)),
    }


def best_of(calls, repeat, device):
    """Each call's best time over `repeat` rounds, the calls alternating within a round."""
    seconds = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            sync(device)  # on CUDA, time the work, not its launch
            start = time.perf_counter()
            call()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: min(s) for name, s in seconds.items()}


@torch.no_grad()
def compare(device, dtype, size, repeat):
    """Rows (part, dtype, ours, theirs or None) for one dtype."""
    models = random_models(read_configs(), device, dtype, compile=False)
    twins = diffusers_twins(models)
    first, best = {}, {}
    for name, (ours, theirs) in parts(models, twins, size).items():
        calls = {"ours": ours, **({"theirs": theirs} if theirs else {})}
        # A first call also picks kernels and allocates (and ldm_min's packs its weights). ldm_min goes first,
        # so it also pays for set-up both then share (on CUDA: loading kernels, cuDNN's plan for each shape).
        first[name] = best_of(calls, 1, device)
        best[name] = best_of(calls, repeat, device)

    def run(side, once):
        """The paper's run: E(y), 30 UNet steps, D(z_0); the sampler's own arithmetic is negligible."""
        if side not in best["UNet step"]:
            return None
        return (once["VAE encode"][side] + once["UNet step"][side] + (PAPER_STEPS - 1) * best["UNet step"][side]
                + once["VAE decode"][side])
    rows = [(name, times["ours"], times.get("theirs")) for name, times in best.items()]
    rows.append((f"{PAPER_STEPS}-step run (enc + {PAPER_STEPS} UNet + dec)", run("ours", best), run("theirs", best)))
    rows.append(("the same, each part's first call counted", run("ours", first), run("theirs", first)))
    return [(name, str(dtype).removeprefix("torch."), ours, theirs) for name, ours, theirs in rows]


def seconds(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the best counts (default 3)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
        print(f"{torch.get_num_threads()} threads; native bf16: {', '.join(native) or 'none'}; torch {torch.__version__}")
    print("| part | dtype | ldm_min | diffusers | ratio |\n|---|---|---|---|---|")
    for dtype in args.dtype.split(","):
        for name, kind, ours, theirs in compare(device, getattr(torch, dtype), args.size, args.repeat):
            ratio = f"{ours / theirs:.2f}" if theirs else "-"
            print(f"| {name} | {kind} | {seconds(ours)} | {seconds(theirs) if theirs else '-'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
