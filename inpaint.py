"""Inpaint the white area of MASK in IMAGE with Stable Diffusion v1.4 (Kakinuma et al., Algorithm 1).

    python inpaint.py photo.png mask.png                       # writes photo_inpainted.png
    python inpaint.py photo.png mask.png --prompt "a red boat" -o boat.png
"""
import argparse
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

from PIL import Image


def fail(message, status=2):
    print(message, file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        fail(f"error: {message} (see --help)")


def parse_args(argv):
    from ldm_min import Options
    from ldm_min.images import LATENT_MASK_RULES
    from ldm_min.region import FULL_UP_TO, MODEL_SIDE, REGIONS

    default = Options()  # the paper's settings, defined there only
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="the picture to complete (any format Pillow reads)")
    p.add_argument("mask", help="same size as IMAGE; white (>= 128) marks the pixels to paint")
    p.add_argument("-o", "--output", help="output file (default: <image stem>_inpainted.png here)")
    p.add_argument("--prompt", default=default.prompt,
                   help="text to steer the fill (default: none, as in the paper); auto: a BLIP caption of the "
                        "masked image, printed first")
    p.add_argument("--captioner", help="with --prompt auto: a BLIP captioner's folder or hub repo id "
                                       "(default: Salesforce/blip-image-captioning-large)")
    p.add_argument("--steps", type=int, default=default.steps, help="DDIM steps T (default %(default)s)")
    p.add_argument("--eta", type=float, default=default.eta,
                   help="DDIM eta: 0 deterministic, 1 DDPM (default %(default)s)")
    p.add_argument("--guidance", type=float, default=default.guidance,
                   help="classifier-free guidance scale, with --prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=default.seed, help="random seed (default %(default)s)")
    p.add_argument("--mask-dilate", dest="dilate", type=int, default=default.dilate,
                   help="grow the latent hole by this many latent pixels (default %(default)s)")
    p.add_argument("--latent-mask", choices=LATENT_MASK_RULES, default=default.latent_mask,
                   help="how the hole reaches the 8x smaller latent: nearest, the paper's, samples one pixel "
                        "per 8x8 cell and can miss thin strokes; cover takes every cell the hole touches "
                        "(default %(default)s)")
    p.add_argument("--region", choices=REGIONS, default=default.region,
                   help=f"auto: an image over {FULL_UP_TO} px a side is inpainted in a crop around the hole, at the "
                        f"model's {MODEL_SIDE} px scale, and every other pixel is kept; full: the whole image, as in "
                        f"the paper (default %(default)s)")
    p.add_argument("--region-margin", type=int, default=default.region_margin,
                   help="with --region auto: pixels of context around the hole, at the model's scale "
                        "(default %(default)s)")
    p.add_argument("--invert-mask", action="store_true", help="black marks the pixels to paint")
    p.add_argument("--paste-back", action="store_true", help="put the original known pixels back over the result")
    p.add_argument("--feather", type=int, default=default.feather,
                   help="with --paste-back: blend over this many pixels (default %(default)s)")
    p.add_argument("--weights", help="local folder or hub repo id (default: $LDM_MIN_WEIGHTS, "
                                     "else CompVis/stable-diffusion-v1-4)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 "
                                                   "(auto: float16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on CUDA)")
    p.add_argument("--quiet", action="store_true", help="print errors only")
    return p.parse_args(argv)


def output_path(args):
    """The output file, checked before any work: never an input, in an existing folder, a known format."""
    from ldm_min import InputError

    out = Path(args.output) if args.output else Path(Path(args.image).stem + "_inpainted.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"output {out}: unknown image format {out.suffix!r} (use .png)")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    if any(out.exists() and Path(p).exists() and out.samefile(p) for p in (args.image, args.mask)):
        raise InputError(f"output {out} is an input file: refusing to overwrite it (use -o)")
    return out


def progress(steps, quiet):
    """A callback for sample(): a one-line progress bar on stderr."""
    start = time.perf_counter()

    def show(i, *_):
        if quiet:
            return
        done = i + 1
        per_step = (time.perf_counter() - start) / done
        bar = "#" * (20 * done // steps)
        end = "\n" if done == steps else ""
        print(f"\rstep {done}/{steps} [{bar:<20}] {per_step:.2f} s/step", end=end, file=sys.stderr, flush=True)

    return show


def auto_prompt(x, hole, args):
    """The caption of the masked image, printed; the captioner is freed before the SD weights load."""
    import transformers

    from ldm_min.caption import caption_tensors
    from weights import load_captioner

    transformers.logging.set_verbosity_error()  # its loading chatter is no news to a user
    transformers.logging.disable_progress_bar()
    text = caption_tensors(x, hole, load_captioner(args.captioner, args.device, args.dtype))
    if not args.quiet:
        print(f"caption: {text}", file=sys.stderr)
    return text


def main(argv=None):
    args = parse_args(argv)
    from ldm_min import Options, images, region
    from jobs import save_atomically
    from ldm_min.sample import inpaint_tensors
    from weights import load_models

    if args.quiet:
        warnings.simplefilter("ignore")
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)  # one line, no source
    start = time.perf_counter()
    # Every option and input is checked before the weights load, so a mistake costs no wait
    # (load_models checks --device and --dtype before it reads a file).
    options = Options(**{field.name: getattr(args, field.name) for field in fields(Options)})
    out = output_path(args)
    x, hole = images.prepare(images.open_image(args.image), images.open_image(args.mask, "mask"), options.invert_mask)
    box = region.box_for(hole, options)  # for the summary line; inpaint_tensors makes the same choice
    if options.prompt == "auto":
        options = replace(options, prompt=auto_prompt(x, hole, args))
    models = load_models(args.weights, args.device, args.dtype, args.compile)
    result = inpaint_tensors(x, hole, models, options, progress(options.steps, args.quiet))
    save_atomically(images.to_pil(result), out)
    if not args.quiet:
        dtype = str(models.dtype).removeprefix("torch.")
        where = f"{box}, " if box else ""
        print(f"seed {options.seed}, {options.steps} steps, eta {options.eta}, {models.device.type} {dtype}, "
              f"{where}{time.perf_counter() - start:.1f} s -> {out}", file=sys.stderr)


def run(argv=None, main=main, interrupted="interrupted: nothing was written"):
    """main(argv) with every expected failure as one line on stderr and exit status 2 (130 and
    `interrupted` for Ctrl-C). benchmarks/table1.py runs its own main through it too."""
    from ldm_min import LdmMinError

    import torch

    try:
        main(argv)
    except LdmMinError as e:
        fail(f"error: {e}")
    except KeyboardInterrupt:
        fail(interrupted, 130)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        fail("error: out of memory: try a smaller image, --dtype bfloat16, or a GPU")


if __name__ == "__main__":
    run()
