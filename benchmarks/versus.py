"""ldm_min against diffusers, the implementation people would otherwise use, and against itself
without its CPU speed-ups: each part (UNet step, VAE encode, VAE decode) timed in one process, on the
same random v1.4-size weights and the same inputs, alternating, best of N; the paper's 30-step run
estimated from the parts.

    python benchmarks/versus.py --dtype float32,bfloat16 --repeat 3
    python benchmarks/versus.py --dtype float32 --repeat 3 --isa AVX2,AVX512_CORE_BF16
    python benchmarks/versus.py --device cuda --dtype float16 --repeat 20

On the CPU the columns are: `plain`, the modules as built; `ldm_min`, as loaded, with the speed-ups
that ldm_min/fast.py picks for this machine and each part (`fast.packs`); `packed`, every speed-up
on every part, the convolutions packed too (shown where it differs from ldm_min's). `--isa` runs
it all again under each `ONEDNN_MAX_CPU_ISA` level, the kernels of a lesser CPU. End-to-end runs
of a few steps are no evidence for a per-step rule: the VAE and the first calls dominate them.

On a CPU, `openvino` is the engine CPU users pick (FastSD CPU and optimum-intel run on it): diffusers'
UNet and VAE, holding the same weights, converted by `openvino.convert_model` at the run's static
shapes and compiled for one stream of latency with torch's thread count and an explicit
INFERENCE_PRECISION_HINT, the run's dtype (OpenVINO itself would pick bfloat16 on any CPU with
AVX512-BF16). It converts float32 weights (the bfloat16 ones upcast), and takes float32 inputs.

diffusers and OpenVINO are never dependencies of ldm_min: install them in a throwaway path (beside
this project's requirements, e.g. `pip install --target DIR diffusers openvino`, then PYTHONPATH=DIR)
to get the comparison. Without them, only ldm_min's figures print. Compare only figures from one
run: machines, and the load on one machine, differ.
"""
import argparse
import copy
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import PAPER_STEPS, random_models, speed_ups, sync  # noqa: E402
from ldm_min import fast  # noqa: E402
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


class Output(torch.nn.Module):
    """A diffusers module's call returning the one tensor OpenVINO's converter is to follow."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self, *args):
        return self.call(*args)


def openvino_calls(twins, inputs, dtype):
    """part -> a call of OpenVINO's compiled twin of that part on `inputs` (part -> its float32
    input tensors), or {} when OpenVINO is not installed. How far each output is from the float32
    twin's goes to stderr: the engine is timed on the same function."""
    try:
        import openvino
    except ImportError:
        return {}
    unet, vae = (copy.deepcopy(twin).float() for twin in twins)  # float32 weights to convert, also from bfloat16
    modules = {"UNet step": Output(lambda z, t, c: unet(z, t, encoder_hidden_states=c).sample),
               "VAE encode": Output(lambda x: vae.encode(x).latent_dist.mean),
               "VAE decode": Output(lambda z: vae.decode(z).sample)}
    config = {"INFERENCE_PRECISION_HINT": {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype],
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
    core, calls = openvino.Core(), {}
    for part, module in modules.items():
        example = inputs[part]
        model = openvino.convert_model(module, example_input=example)
        for port, tensor in zip(model.inputs, example):  # static shapes: the run's own
            port.get_node().set_partial_shape(openvino.PartialShape(list(tensor.shape)))
        model.validate_nodes_and_infer_types()
        request = core.compile_model(model, "CPU", config).create_infer_request()
        arrays = [tensor.numpy() for tensor in example]
        calls[part] = lambda request=request, arrays=arrays: request.infer(arrays)
        expected = module(*example)
        off = (torch.from_numpy(calls[part]()[0]) - expected).norm() / expected.norm()
        print(f"openvino {str(dtype).removeprefix('torch.')} {part}: {off:.1e} of the norm from diffusers' "
              f"float32 output", file=sys.stderr)
    return calls


def plain_and_sped_up(device, dtype):
    """side -> Models: `plain` as built; on a CPU where oneDNN packs, `ldm_min` as loaded (fast.speed_up)
    and, where fast.packs leaves the VAE's convolutions plain, `packed` with them packed too. Each side
    holds a copy of the plain weights; `packed` shares ldm_min's UNet, which is packed."""
    with speed_ups(False):  # random_models ends in fast.speed_up: here, with no CPU speed-up
        sides = {"plain": random_models(read_configs(), device, dtype, compile=False)}
    if device.type != "cpu" or not fast.can_pack(dtype):
        return {"ldm_min": fast.speed_up(sides["plain"])}
    sides["ldm_min"] = fast.speed_up(copy.deepcopy(sides["plain"]))
    if not fast.packs("vae", dtype):
        vae = copy.deepcopy(sides["plain"].vae)
        fast.pack(vae, convolutions=True)
        fast.fuse_upsampling(vae)
        sides["packed"] = dataclasses.replace(sides["ldm_min"], vae=vae)
    return sides


def parts(sides, twins, size):
    """part -> side -> a call of that part, the same input to each side."""
    models = sides["ldm_min"]
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(models.device, models.dtype)
    z = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(models.device, models.dtype)
    context = models.encode_text("")
    t = torch.tensor(500, device=models.device)
    calls = {"UNet step": {}, "VAE encode": {}, "VAE decode": {}}
    for side, m in sides.items():
        if side != "packed":  # its UNet is ldm_min's
            calls["UNet step"][side] = lambda m=m: m.unet(z, t, context)
        calls["VAE encode"][side] = lambda m=m: m.vae.encode(x)
        calls["VAE decode"][side] = lambda m=m: m.vae.decode(z)
    if twins:
        unet, vae = twins
        calls["UNet step"]["diffusers"] = lambda: unet(z, t, encoder_hidden_states=context).sample
        calls["VAE encode"]["diffusers"] = lambda: vae.encode(x).latent_dist.mean
        calls["VAE decode"]["diffusers"] = lambda: vae.decode(z / models.vae.scaling_factor).sample
        if models.device.type == "cpu":
            inputs = {"UNet step": (z.float(), t, context.float()), "VAE encode": (x.float(),),
                      "VAE decode": ((z / models.vae.scaling_factor).float(),)}
            for part, call in openvino_calls(twins, inputs, models.dtype).items():
                calls[part]["openvino"] = call
    return calls


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
    """Rows (part, {side: seconds}) for one dtype."""
    sides = plain_and_sped_up(device, dtype)
    twins = diffusers_twins(next(iter(sides.values())))  # sharing the plain weights
    first, best = {}, {}
    for name, calls in parts(sides, twins, size).items():
        # A first call also picks kernels and allocates (and ldm_min's packs its weights). ldm_min goes first,
        # so it also pays for set-up both then share (on CUDA: loading kernels, cuDNN's plan for each shape).
        first[name] = best_of(dict(sorted(calls.items(), key=lambda kv: kv[0] != "ldm_min")), 1, device)
        best[name] = best_of(calls, repeat, device)
        if "packed" in sides:  # its UNet is ldm_min's, timed once
            for times in (first[name], best[name]):
                times.setdefault("packed", times["ldm_min"])

    def run(once):
        """The paper's run: E(y), 30 UNet steps, D(z_0); the sampler's own arithmetic is negligible."""
        return {side: once["VAE encode"][side] + once["UNet step"][side] + (PAPER_STEPS - 1) * best["UNet step"][side]
                + once["VAE decode"][side] for side in best["UNet step"]}
    rows = list(best.items())
    rows.append((f"{PAPER_STEPS}-step run (enc + {PAPER_STEPS} UNet + dec)", run(best)))
    rows.append(("the same, each part's first call counted", run(first)))
    return rows


def seconds(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the best counts (default 3)")
    p.add_argument("--isa", help="comma-separated ONEDNN_MAX_CPU_ISA levels to run under, each in a process of "
                                 "its own (e.g. AVX2,AVX512_CORE_BF16; default: this CPU's own)")
    return p.parse_args(argv)


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def main(argv=None):
    args = parse_args(argv)
    if args.isa:  # oneDNN reads its level once, at start: a process for each
        for level in args.isa.split(","):
            print(f"\nONEDNN_MAX_CPU_ISA={level}", flush=True)
            subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                            "--size", str(args.size), "--repeat", str(args.repeat)],
                           env={**os.environ, "ONEDNN_MAX_CPU_ISA": level}, check=True)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
        cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
        print(f"{cpu}; {torch.get_num_threads()} threads; native bf16: {', '.join(native) or 'none'}; "
              f"oneDNN level {os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}; torch {torch.__version__}")
    print("| part | dtype | plain | ldm_min | packed | diffusers | openvino | ldm_min / plain | ldm_min / diffusers "
          "| ldm_min / openvino |\n|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype.split(","):
        for name, times in compare(device, getattr(torch, dtype), args.size, args.repeat):
            shown = lambda side: seconds(times[side]) if side in times else "-"
            print(f"| {name} | {dtype} | {shown('plain')} | {shown('ldm_min')} | {shown('packed')} | "
                  f"{shown('diffusers')} | {shown('openvino')} | {ratio(times['ldm_min'], times.get('plain'))} | "
                  f"{ratio(times['ldm_min'], times.get('diffusers'))} | {ratio(times['ldm_min'], times.get('openvino'))} |",
                  flush=True)


if __name__ == "__main__":
    main()
