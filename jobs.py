"""Running a fixed list of jobs on one process or across many with torchrun, resumably.

    world = jobs.start("cuda")              # under torchrun: one process per GPU (NCCL) or CPU process (gloo)
    todo = [j for j in all_jobs if not jobs.done(out_of(j))]
    for job in jobs.mine(todo, world, "inpainting"):
        jobs.save_atomically(make(job), out_of(job))
    for batch in jobs.mine(jobs.batches(todo, 8), world, "inpainting", size=len):  # or 8 jobs at a time
        ...
    results = jobs.gather(my_results, world)   # every rank's list, on every rank

Outside torchrun it is a plain single process and nothing distributed is touched. Every output is
written to a temporary file and renamed, so a file that exists is complete: "done" is "exists",
and an interrupted run loses only the jobs in flight. All processes must see the same folder
(one machine, or a shared file system across nodes).
"""
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image


LINE = 64  # progress lines are padded to this width, so that a shorter one overwrites a longer one


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL needs them on the GPU)


def start(device_type="cpu"):
    """Join torchrun's process group, read from its environment (RANK, WORLD_SIZE, LOCAL_RANK, ...):
    NCCL with one GPU per local rank on CUDA, gloo on the CPU. A single process without torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return World()
    if device_type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


def stop(world):
    if world.size > 1:
        dist.destroy_process_group()


def barrier(world):
    if world.size > 1:
        dist.barrier()


def gather(items, world):
    """Every rank's list of (picklable) items, concatenated in rank order, on every rank."""
    if world.size == 1:
        return list(items)
    parts = [None] * world.size
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def share(todo, rank, size):
    """This rank's jobs: every size-th one from its rank on. Deterministic, and the shares differ by
    at most one job."""
    return todo[rank::size]


def batches(todo, n):
    """`todo` in lists of up to n consecutive jobs, to be shared out whole: the same lists however
    many processes run them, so 1 and N processes still make the same computations."""
    return [todo[i:i + n] for i in range(0, len(todo), n)]


def pending(items, path_of, world):
    """The items whose output `path_of(item)` is not there yet. Every rank looks before any rank
    writes again (the barrier), so all ranks share out the same list."""
    todo = [item for item in items if not done(path_of(item))]
    barrier(world)
    return todo


def mine(todo, world, what="jobs", quiet=False, size=lambda job: 1):
    """Yield this rank's share of `todo`, in rounds: after each round, every rank says how many jobs
    it finished, and rank 0 shows the count over all ranks on one progress line (stderr). A rank
    with no job left in a round still takes part, so the counts always meet. size(job): how many
    to count it as (`len` for `batches`)."""
    share_ = share(todo, world.rank, world.size)
    rounds = -(-len(todo) // world.size)
    total = sum(map(size, todo))
    start_time, finished = time.perf_counter(), 0
    show = world.rank == 0 and not quiet and rounds > 0
    for i in range(rounds):
        if i < len(share_):
            yield share_[i]
        count = torch.tensor([size(share_[i]) if i < len(share_) else 0], device=world.device)
        if world.size > 1:
            dist.all_reduce(count)
        finished += int(count.item())
        if show:
            rate = (time.perf_counter() - start_time) / finished
            bar = "#" * (20 * finished // total)
            line = f"{what} {finished}/{total} [{bar:<20}] {rate:.2f} s/job"
            print(f"\r{line:<{LINE}}", end="\n" if i == rounds - 1 else "", file=sys.stderr, flush=True)


def done(path):
    """Whether an output is already there. Outputs are only ever renamed into place, whole."""
    return Path(path).is_file()


def _write_atomically(out, write):
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def save_atomically(image, out):
    """Write a PIL image to a temporary file beside `out`, then rename: an interrupted run leaves no
    partial file. The format follows the suffix."""
    out = Path(out)
    _write_atomically(out, lambda f: image.save(f, format=Image.registered_extensions()[out.suffix.lower()]))


def write_text_atomically(text, out):
    _write_atomically(out, lambda f: f.write(text.encode()))


def write_json_atomically(value, out):
    write_text_atomically(json.dumps(value, indent=2) + "\n", out)
