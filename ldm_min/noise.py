"""The noise of a latent sampler (`sample()`, `blend()`): every draw float32 on a CPU generator of
the image's own seed, in a fixed order (docs/conventions.md), so that a seed gives the same picture
on any device and in any batch."""
import torch


def draws(seed, like, *counts):
    """For each of `counts`, that many N(0, I) draws shaped like one image of `like` (B, ...) for
    each image: a tensor (count, B, ...) on like's device. `seed`: a list of B seeds, one per image
    (an int is the seed of a single image). Each image draws from a CPU generator seeded with its
    own seed: the first count's draws in order, then the next count's. An entry may instead be a CPU
    torch.Generator, drawn from where it stands (benchmarks/table1.py --protocol authors, whose noise
    runs on from image to image). All are drawn here and moved in one copy: a copy to a GPU waits for
    it to finish its queued work, and inside the sampling loop that would stall every step."""
    generators = [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(s)
                  for s in ([seed] if isinstance(seed, int) else seed)]
    draw = lambda: torch.cat([torch.randn(like[:1].shape, generator=g) for g in generators])  # one per image
    return torch.stack([draw() for _ in range(sum(counts))]).to(like.device).split(counts)
