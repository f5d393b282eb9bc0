"""Where a UNet step's time goes, per kind of op: ldm_min as loaded (torch.profiler's self time) and,
where it is installed, OpenVINO (its own per-node counters, PERF_COUNT) on the same random v1.4-size
weights, at 512x512, one call each after warm-up calls.

    python benchmarks/where.py --dtype bfloat16
    PYTHONPATH=DIR python benchmarks/where.py --dtype float32   # DIR: pip install --target DIR openvino diffusers

OpenVINO is compiled as in versus.py (static shapes, its precision hint set to the dtype, one stream of
latency, torch's threads). Its counters add a little time of their own, and a node fuses what it
can (a convolution's bias and residual add, an attention's three products), so read its rows as its
kinds of work, not as ours: which kinds take the time, and how much. Compare only figures from one run.
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import versus  # noqa: E402  (its path setup makes ldm_min and weights importable)
from bench import random_models, speed_ups  # noqa: E402
from ldm_min import fast  # noqa: E402
from weights import read_configs  # noqa: E402

ELEMENTWISE = ("aten::silu", "aten::gelu", "aten::add", "aten::mul", "aten::copy_", "aten::cat", "aten::upsample")


def kind(event):
    """The kind of work of one of torch.profiler's ops."""
    name = event.key
    for prefix, label in (("mkldnn::_convolution", "convolutions"), ("mkldnn::_linear", "linears"),
                          # the blocked attention's own calls: its products on oneDNN's tensors, or batched
                          # over heads (bmm) where a head is small, its softmax on oneDNN's tensors
                          ("aten::mkldnn_linear", "attention: products"), ("aten::bmm", "attention: products"),
                          ("aten::_softmax", "attention: softmax"),
                          ("aten::to_mkldnn", "attention: to and from oneDNN's tensors"),
                          ("aten::to_dense", "attention: to and from oneDNN's tensors"),
                          ("aten::_to_dense", "attention: to and from oneDNN's tensors"),  # to_dense's own time
                          ("aten::_scaled_dot_product", "attention: PyTorch's fused kernel"),
                          ("aten::native_group_norm", "group and layer norms"), ("aten::native_layer_norm",
                                                                                 "group and layer norms")):
        if name.startswith(prefix):
            return label
    return "element-wise (SiLU, GELU, adds, copies)" if name.startswith(ELEMENTWISE) else "the rest"


def ours(models, z, t, context):
    with torch.no_grad():
        for _ in range(2):
            models.unet(z, t, context)
        with profile() as run:
            models.unet(z, t, context)
    seconds = collections.Counter()
    for event in run.key_averages():
        seconds[kind(event)] += event.self_cpu_time_total / 1e6
    return seconds


def openvino(models, z, t, context, dtype):
    try:
        import openvino  # noqa: F401  (only whether it is installed)
    except ImportError:
        return None
    twins = versus.diffusers_twins(models)  # what OpenVINO converts: without diffusers, nothing
    if twins is None:
        return None
    unet = versus.float32_modules(twins)["UNet step"]
    example = (z.float(), t, context.float())
    request = versus.openvino_request(unet, example, {**versus.openvino_config(dtype), "PERF_COUNT": "YES"})
    for _ in range(3):
        request.infer([tensor.numpy() for tensor in example])
    seconds = collections.Counter()
    for node in request.profiling_info:
        label = "attention (one fused node)" if "scaled_dot_product" in node.node_name else node.node_type
        seconds[label] += node.real_time.total_seconds()
    return seconds


def show(engine, seconds):
    total = sum(seconds.values())
    print(f"\n{engine}: {total:.2f} s in all\n| kind of work | seconds | share |\n|---|---|---|")
    for label, s in seconds.most_common():
        if s >= 0.001:
            print(f"| {label} | {s:.3f} | {s / total:.0%} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 8 (default 512)")
    args = p.parse_args(argv)
    if args.size % 8 or args.size <= 0:
        p.error("--size must be a positive multiple of 8")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(versus.machine(torch.device("cpu")))
    with speed_ups(False):  # built plain: OpenVINO converts these, then ldm_min's speed-ups are applied
        plain = random_models(read_configs(), torch.device("cpu"), dtype, compile=False)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=generator).to(dtype)
    t, context = torch.tensor(500), plain.encode_text("")
    theirs = openvino(plain, z, t, context, dtype)
    show(f"ldm_min as loaded, {args.dtype}", ours(fast.speed_up(plain), z, t, context))
    if theirs:
        show(f"OpenVINO, {args.dtype}", theirs)


if __name__ == "__main__":
    main()
