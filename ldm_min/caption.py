"""Prompts from the picture itself (`--prompt auto`): a BLIP caption of the masked image.

The paper's Table 1 shows that a caption of the *original* image helps, and names as future work
a prompt derived from the *masked* image, which is what a user has. The captioner must not see
the hole's pixels (they are what is to be painted), nor a grey square that it would describe as
such, so the hole is filled from the known pixels around it: a smooth blur of its surroundings.
"""
import torch
import torch.nn.functional as F

from . import images


def fill_from_known(x, hole):
    """x with its hole filled by the known pixels blurred into it: each hole pixel takes the mean
    of the known pixels of the smallest power-of-two cell around it that has any ("pull-push").
    Nothing of x inside the hole is used."""
    known = 1 - hole
    if known.all() or not known.any() or min(x.shape[-2:]) == 1:
        return x * known
    cell_sum = F.avg_pool2d(x * known, 2, ceil_mode=True)
    cell_known = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = fill_from_known(cell_sum / cell_known.clamp_min(1e-8), (cell_known == 0).float())
    return known * x + hole * F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def caption_tensors(x, hole, captioner):
    """BLIP's caption of x (1, 3, H, W) in [-1, 1] with its hole (1, 1, H, W) filled from the known
    pixels. `captioner`: (model, processor) from `weights.load_captioner`."""
    model, processor = captioner
    inputs = processor(images=images.to_pil(fill_from_known(x, hole)), return_tensors="pt")
    pixels = inputs.pixel_values.to(model.device, model.dtype)
    ids = model.generate(pixel_values=pixels, max_new_tokens=40)
    return processor.decode(ids[0], skip_special_tokens=True).strip()


def caption(image, mask, captioner, invert_mask=False):
    """The caption of `image` (PIL) with the hole that `mask` (PIL) marks hidden from the captioner."""
    return caption_tensors(*images.prepare(image, mask, invert_mask), captioner)
