"""The inpainting pipeline around the samplers: from a photo and its mask to the paper's inputs
(E(y) and M_l, `prepare`), through Algorithm 1 (`sample.py`) or the blend it is audited against
(`blend.py`, Options(method="blend")), to the result (`finish`); `eps_model` is eps_theta with
classifier-free guidance. `inpaint` is the one call; `inpaint_batch` runs many pictures at once.
"""
from dataclasses import replace

import torch

from . import images, region
from .blend import blend
from .errors import InputError, LdmMinError, NonFiniteError
from .options import Options
from .sample import sample


def eps_model(models, prompt, guidance):
    """eps_theta(z_t, t) of `models`, float32 in and out. With a prompt, classifier-free guidance
    eps_u + g (eps_c - eps_u) from one UNet pass on twice the batch; without one (or at g = 1,
    where that is just eps_c), one pass on the prompt's embedding (docs/conventions.md). For a
    batch of images, `prompt` is a list: one prompt per image."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    guided = any(prompts) and guidance != 1
    embeddings = {p: models.encode_text(p) for p in dict.fromkeys(prompts)}  # each distinct prompt once
    context = torch.cat([embeddings[p] for p in prompts])  # one row per image
    if guided:
        context = torch.cat([models.encode_text("").expand_as(context), context])  # [unconditional, conditional]
    return unet_eps(models, context, guidance if guided else None)


def unet_eps(models, context, guidance=None):
    """eps_theta(z_t, t): the UNet on `context`, one row per image, float32 in and out. With a
    `guidance` g, context holds [unconditional, conditional] rows for twice the batch, and eps is
    eps_u + g (eps_c - eps_u) from one UNet pass on both."""
    guided = guidance is not None

    def eps_theta(z, t):
        # t goes in as a tensor on the UNet's device: a compiled UNet takes that as an input,
        # where it would compile anew for each new Python int. torch.full writes it there, where
        # torch.tensor would copy it from the CPU and wait for the GPU.
        z = z.to(models.dtype)
        eps = models.unet(torch.cat([z, z]) if guided else z, torch.full((), t, device=z.device), context).float()
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        return eps

    return eps_theta


@torch.no_grad()
def inpaint(image, mask, models, options=Options(), callback=None):
    """Fill the hole of `image` (PIL) that `mask` (PIL) marks, white unless options.invert_mask;
    returns a PIL RGB image of the same size. `callback` as for `sample()` (`blend()` with
    options.method "blend")."""
    x, hole = images.prepare(image, mask, options.invert_mask)
    return images.to_pil(inpaint_tensors(x, hole, models, options, callback))


@torch.no_grad()
def inpaint_tensors(x, hole, models, options, callback=None):
    """`inpaint()` on the tensors of `images.prepare()`: x (1, 3, H, W) in [-1, 1], hole
    (1, 1, H, W), 1 = paint here. Returns the result, (1, 3, H, W) in [-1, 1]. A big image is
    inpainted in a crop around the hole (`region.box_for`), at the model's scale."""
    [result] = inpaint_batch([(x, hole, options)], models, callback)
    if isinstance(result, LdmMinError):
        raise result
    return result


@torch.no_grad()
def inpaint_batch(pictures, models, callback=None):
    """`inpaint_tensors()` of each (x, hole, options) of `pictures`, those of one size inside the
    model (after the region's crop and the padding) and with the same settings but for the seed and
    the prompt sampled together, through each UNet call. Each draws its own seed's noise, so each
    result is the one it gives alone, up to float rounding. Returns, per picture, its result or the
    LdmMinError it failed with: a picture fails alone."""
    results, batches = [None] * len(pictures), {}
    for k, (x, hole, options) in enumerate(pictures):
        try:
            prepared = prepare(x, hole, models, options)
        except InputError as e:
            results[k] = e
            continue
        _, _, _, options, Ey, _ = prepared
        same = (Ey.shape, options.method, options.steps, options.eta, options.guidance, bool(options.prompt))
        batches.setdefault(same, []).append((k, *prepared))
    # One image at a time through the VAE's decoder: its peak memory is one image's (check_memory).
    D = lambda z: torch.cat([models.vae.decode(z_k.to(models.dtype)).float() for z_k in z.split(1)])
    for batch in batches.values():
        ks, boxes, xs, holes, settings, Eys, M_ls = zip(*batch)
        first = settings[0]  # the settings they share
        sampler = blend if first.method == "blend" else sample  # where E(y) enters: z_t, or eq. 5's z_{0|t}
        x0s = sampler(eps_model(models, [s.prompt for s in settings], first.guidance), torch.cat(Eys),
                      torch.cat(M_ls), D, models.schedule, T=first.steps, eta=first.eta,
                      seed=[s.seed for s in settings], callback=callback)
        for k, x0, x, hole, box, options in zip(ks, x0s.split(1), xs, holes, boxes, settings):
            try:
                result = finish(x0, x, hole, models, options)
            except NonFiniteError as e:
                results[k] = e
                continue
            whole_x, whole_hole, _ = pictures[k]
            results[k] = region.paste_crop(whole_x, whole_hole, box, result) if box else result
    return results


def prepare(x, hole, models, options):
    """One picture's inputs to Algorithm 1: E(y) and M_l, of its crop at the model's scale when the
    region says so (`region.box_for`), padded to multiples of 8. Returns (box, x, hole, options,
    Ey, M_l), x and hole those of the crop, and options the crop's own."""
    box = region.box_for(hole, options)
    if box:  # the crop itself, at the model's scale; blended over the hole after
        x, hole = region.scaled_crop(x, hole, box)
        options = replace(options, region="full", paste_back=False)
    x, hole = x.to(models.device), hole.to(models.device)
    x8, hole8 = images.pad_to_8(x, hole)
    models.check_memory(*x8.shape[-2:])
    y = x8 * (1 - hole8)                                              # y = M_p * x: holes at 0, mid-grey
    Ey = models.vae.encode(y.to(models.dtype)).float()                # E(y), computed once
    M_l = images.latent_known_mask(hole8, options.dilate, options.latent_mask)
    images.check_latent_hole(hole8, M_l)
    return box, x, hole, options, Ey, M_l


def check_finite(x0, models):
    """Raise NonFiniteError, with what to do about it, if x_0 = D(z_0) holds an inf or a NaN."""
    if not torch.isfinite(x0).all():
        dtype = str(models.dtype).removeprefix("torch.")
        advice = {"float16": "float16 overflowed: run again with --dtype bfloat16 or float32",
                  "bfloat16": "run again with --dtype float32"}.get(
            dtype, "the model itself gave non-finite values: corrupt weights, or an extreme guidance?")
        raise NonFiniteError(f"sampling produced inf/NaN in {dtype}: {advice}")


def finish(x0, x, hole, models, options):
    """The result of one image from its x_0 = D(z_0): checked, the padding cropped off, pasted back."""
    check_finite(x0, models)
    x0 = x0[..., :x.shape[-2], :x.shape[-1]]                          # crop the padding back off
    if options.paste_back:
        x0 = images.paste_back(x0, x, hole, options.feather)
    return x0
