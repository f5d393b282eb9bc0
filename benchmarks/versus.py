"""ldm_min against diffusers, the implementation people would otherwise use, the CPU engines, and itself
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
`onnxruntime`, in float32 only (its x86 kernels have no bfloat16 convolutions): the same modules
exported by `torch.onnx.export` at static shapes, every graph optimisation, torch's thread count.
How far each engine's output is from diffusers' float32 one goes to stderr. Each dtype runs in a
process of its own, its memory freed with it. In float32 ldm_min's sides and all three engines
passed 24 GiB: there, time ONNX Runtime in a run of its own (`--engines onnxruntime`).

diffusers, OpenVINO and ONNX Runtime are never dependencies of ldm_min: install them in a throwaway
path (beside this project's requirements, e.g. `pip install --target DIR diffusers openvino
onnxruntime onnx onnxscript`, then PYTHONPATH=DIR) to get the comparison. Without them, only
ldm_min's figures print. Compare only figures from one run: machines, and the load on one machine,
differ. `benchmarks/where.py` says where a UNet step's time goes, per kind of op, in ldm_min and in
OpenVINO.
"""
import argparse
import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import PAPER_STEPS, random_models, speed_ups, sync  # noqa: E402
from ldm_min import fast  # noqa: E402
from weights import read_configs  # noqa: E402


ENGINES = ("diffusers", "openvino", "onnxruntime")


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
    """A diffusers module, held so that exporters see its weights, and a call of it returning the one tensor
    they are to follow."""

    def __init__(self, module, call):
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *args):
        return self.call(self.module, *args)


def float32_modules(twins):
    """part -> diffusers' float32 module of that part: what OpenVINO and ONNX Runtime convert (float32
    weights, upcast for a bfloat16 run)."""
    unet, vae = (twin if twin.dtype == torch.float32 else copy.deepcopy(twin).float() for twin in twins)
    return {"UNet step": Output(unet, lambda m, z, t, c: m(z, t, encoder_hidden_states=c).sample),
            "VAE encode": Output(vae, lambda m, x: m.encode(x).latent_dist.mean),
            "VAE decode": Output(vae, lambda m, z: m.decode(z).sample)}


def report(engine, dtype, part, output, expected):
    """How far an engine's output is from diffusers' float32 one, to stderr: the engines are timed on the
    same function."""
    off = (output - expected).norm() / expected.norm()
    print(f"{engine} {str(dtype).removeprefix('torch.')} {part}: {off:.1e} of the norm from diffusers' float32 "
          f"output", file=sys.stderr)


def openvino_config(dtype):
    """OpenVINO's settings that matter: the precision set explicitly (it would pick bfloat16 by itself on
    any CPU with AVX512-BF16), one stream of latency, and torch's thread count."""
    return {"INFERENCE_PRECISION_HINT": {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype],
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}


def openvino_request(module, example, config):
    """An infer request of OpenVINO's compiled `module`, converted at the static shapes of `example` (its
    float32 input tensors), with `config`. OpenVINO must be installed."""
    import openvino

    model = openvino.convert_model(module, example_input=example)
    for port, tensor in zip(model.inputs, example):  # static shapes: the run's own
        port.get_node().set_partial_shape(openvino.PartialShape(list(tensor.shape)))
    model.validate_nodes_and_infer_types()
    return openvino.Core().compile_model(model, "CPU", config).create_infer_request()


def openvino_calls(modules, inputs, dtype):
    """part -> a call of OpenVINO's compiled twin of that part on `inputs` (part -> its float32 input
    tensors), or {} when OpenVINO is not installed."""
    try:
        import openvino  # noqa: F401  (only whether it is installed)
    except ImportError:
        return {}
    config, calls = openvino_config(dtype), {}
    for part, module in modules.items():
        example = inputs[part]
        request = openvino_request(module, example, config)
        arrays = [tensor.numpy() for tensor in example]
        calls[part] = lambda request=request, arrays=arrays: request.infer(arrays)
        report("openvino", dtype, part, torch.from_numpy(calls[part]()[0]), module(*example))
    return calls


def onnxruntime_calls(modules, inputs, dtype):
    """part -> a call of ONNX Runtime's session of that part on `inputs`, or {} when ONNX Runtime is not
    installed or `dtype` is not float32 (its x86 CPU kernels have no bfloat16 convolutions). Each part
    is exported by `torch.onnx.export` at its static shapes, with its weights in a file beside it (the
    UNet passes protobuf's 2 GiB), and run with every graph optimisation and torch's thread count."""
    try:
        import onnxruntime
    except ImportError:
        return {}
    if dtype != torch.float32:
        return {}
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    calls = {}
    with tempfile.TemporaryDirectory() as folder:
        for part, module in modules.items():
            path = str(Path(folder) / f"{part.replace(' ', '_')}.onnx")
            example = inputs[part]
            torch.onnx.export(module, example, path, dynamo=True, external_data=True, verbose=False)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {port.name: tensor.numpy() for port, tensor in zip(session.get_inputs(), example)}
            calls[part] = lambda session=session, feed=feed: session.run(None, feed)
            report("onnxruntime", dtype, part, torch.from_numpy(calls[part]()[0]), module(*example))
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


def parts(sides, twins, size, engines):
    """part -> side -> a call of that part, the same input to each side; `engines`, those of the other
    implementations to time where installed."""
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
        if "diffusers" in engines:
            calls["UNet step"]["diffusers"] = lambda: unet(z, t, encoder_hidden_states=context).sample
            calls["VAE encode"]["diffusers"] = lambda: vae.encode(x).latent_dist.mean
            calls["VAE decode"]["diffusers"] = lambda: vae.decode(z / models.vae.scaling_factor).sample
        if models.device.type == "cpu":
            inputs = {"UNet step": (z.float(), t, context.float()), "VAE encode": (x.float(),),
                      "VAE decode": ((z / models.vae.scaling_factor).float(),)}
            converted = [(engine, made) for engine, made in (("openvino", openvino_calls),
                                                             ("onnxruntime", onnxruntime_calls)) if engine in engines]
            modules = float32_modules(twins) if converted else {}  # a float32 copy in a bfloat16 run: only if used
            for engine, made in converted:
                for part, call in made(modules, inputs, models.dtype).items():
                    calls[part][engine] = call
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
def compare(device, dtype, size, repeat, engines=ENGINES):
    """Rows (part, {side: seconds}) for one dtype."""
    sides = plain_and_sped_up(device, dtype)
    twins = diffusers_twins(next(iter(sides.values())))  # sharing the plain weights
    first, best = {}, {}
    for name, calls in parts(sides, twins, size, engines).items():
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
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated other implementations to time, where installed, '' for none (default "
                        "%(default)s). In float32 all three and ldm_min's sides take more than 24 GiB: there, time "
                        "onnxruntime in a run of its own")
    p.add_argument("--isa", help="comma-separated ONEDNN_MAX_CPU_ISA levels to run under, each in a process of "
                                 "its own (e.g. AVX2,AVX512_CORE_BF16; default: this CPU's own)")
    args = p.parse_args(argv)
    args.engines = [engine for engine in args.engines.split(",") if engine]  # "" for none
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        p.error(f"--engines: {', '.join(sorted(unknown))} is not one of {', '.join(ENGINES)}")
    return args


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


SIDES = ("plain", "ldm_min", "packed", *ENGINES)
AGAINST = ("plain", *ENGINES)  # the ratios printed: ldm_min / each


def machine(device):
    """The first line: the GPU; or the CPU (its model, family and native bfloat16 instructions, the class
    its figures hold for), torch's threads and oneDNN's level."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}; torch {torch.__version__}"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "?")
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in info.split()]
    return (f"{field('model name')} (cpu family {field('cpu family')}); {torch.get_num_threads()} threads; "
            f"native bf16: {', '.join(native) or 'none'}; oneDNN level "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}; torch {torch.__version__}")


def main(argv=None):
    args = parse_args(argv)
    dtypes = args.dtype.split(",")
    if args.isa or len(dtypes) > 1:
        # oneDNN reads its level once, at start; and a dtype's models and engines are freed only with their
        # process (bfloat16's and then float32's in one peaked at 22 GB): a process for each level and dtype.
        for level in args.isa.split(",") if args.isa else [os.environ.get("ONEDNN_MAX_CPU_ISA")]:
            if args.isa:
                print(f"\nONEDNN_MAX_CPU_ISA={level}", flush=True)
            for dtype in dtypes:
                env = {**os.environ, "ONEDNN_MAX_CPU_ISA": level} if level else os.environ
                subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", dtype, "--size",
                                str(args.size), "--repeat", str(args.repeat), "--engines", ",".join(args.engines)],
                               env=env, check=True)
        return
    device = torch.device(args.device)
    print(machine(device))
    print("| part | dtype | " + " | ".join(SIDES) + " | " + " | ".join(f"ldm_min / {side}" for side in AGAINST) + " |\n"
          + "|---" * (2 + len(SIDES) + len(AGAINST)) + "|")
    for name, times in compare(device, getattr(torch, dtypes[0]), args.size, args.repeat, args.engines):
        shown = [seconds(times[side]) if side in times else "-" for side in SIDES]
        ratios = [ratio(times["ldm_min"], times.get(side)) for side in AGAINST]
        print(f"| {name} | {dtypes[0]} | " + " | ".join(shown + ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
