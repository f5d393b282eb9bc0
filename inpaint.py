"""Inpaint the white area of MASK in IMAGE with Stable Diffusion v1.4 (Kakinuma et al., Algorithm 1).

    python inpaint.py photo.png mask.png                       # writes photo_inpainted.png
    python inpaint.py photo.png mask.png --prompt "a red boat" -o boat.png
    python inpaint.py photos/ masks/ -o done/                  # each photo with the mask of its name
    python inpaint.py photos/ masks/ -o done/ --batch 8        # up to 8 photos of one size per UNet call
    torchrun --nproc_per_node=4 inpaint.py photos/ mask.png -o done/   # one mask for all, 4 processes
    python inpaint.py photo.png mask.png --method ddnm --adm-weights 256x256_diffusion_uncond.pt  # the baseline
    python inpaint.py photo.png mask.png --method blend        # the classic way: blend z_t, not eq. 5's z_{0|t}
"""
import argparse
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

from PIL import Image

from ldm_min.options import LATENT_METHODS


def fail(message, status=2):
    print(message, file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        fail(f"error: {message} (see --help)")


def batch_size(text):
    """--batch N: a whole number of images, at least 1 (benchmarks/table1.py takes it too)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid number of images {text!r}: a whole number, at least 1")
    return int(text)


# Stable Diffusion's: the paper's Algorithm 1 and the blend of z_t it is audited against (ldm_min/blend.py);
# then DDNM, the paper's baseline (ldm_min/ddnm.py).
METHODS = (*LATENT_METHODS, "ddnm")
UNSET = object()  # an option not given: each method's own options are refused with the other methods


def parse_args(argv):
    from ldm_min import Options
    from ldm_min.images import LATENT_MASK_RULES
    from ldm_min.options import DdnmOptions
    from ldm_min.region import FULL_UP_TO, MODEL_SIDE, REGIONS

    default, ddnm_default = Options(), DdnmOptions()  # each method's settings, defined there only
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="the picture to complete (any format Pillow reads), or a folder of them")
    p.add_argument("mask", help="same size as IMAGE; white (>= 128) marks the pixels to paint. With a folder of "
                                "images: a folder holding each image's mask under the image's name (any format), "
                                "or one mask for all")
    p.add_argument("-o", "--output", help="output file (default: <image stem>_inpainted.png here); with a folder of "
                                          "images, the output folder (default: <folder name>_inpainted here)")
    p.add_argument("--overwrite", action="store_true",
                   help="with a folder of images: redo the images whose output is there (default: skip them)")
    p.add_argument("--method", choices=METHODS, default="paper",
                   help="paper: the paper's Algorithm 1 on Stable Diffusion v1.4; blend: the same with Blended Latent "
                        "Diffusion's blend of the noisy latent z_t in place of eq. 5, the classic alternative; ddnm: "
                        "DDNM, the paper's baseline, on guided-diffusion's 256 px ImageNet model as DDNM's hq demo "
                        "runs it (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"T: DDIM steps, or DDNM's respaced steps (default {default.steps}, the paper's; "
                        f"{ddnm_default.steps} with --method ddnm, the paper's for DDNM)")
    p.add_argument("--seed", type=int, default=default.seed, help="random seed (default %(default)s)")
    p.add_argument("--invert-mask", action="store_true", help="black marks the pixels to paint")
    paper = p.add_argument_group("Stable Diffusion's methods only (--method paper or blend)")
    paper.add_argument("--batch", type=batch_size, default=1, metavar="N",
                       help="with a folder of images: inpaint up to N images of one size together, through each "
                            "UNet call (default %(default)s); each result is the single run's, up to float rounding")
    paper.add_argument("--prompt", default=default.prompt,
                       help="text to steer the fill (default: none, as in the paper); auto: a BLIP caption of the "
                            "masked image, printed first")
    paper.add_argument("--captioner", help="with --prompt auto: a BLIP captioner's folder or hub repo id "
                                           "(default: Salesforce/blip-image-captioning-large)")
    paper.add_argument("--eta", type=float, default=default.eta,
                       help="DDIM eta, from 0 (deterministic) to 1 (DDPM) (default %(default)s)")
    paper.add_argument("--guidance", type=float, default=default.guidance,
                       help="classifier-free guidance scale, with --prompt (default %(default)s)")
    paper.add_argument("--mask-dilate", dest="dilate", type=int, default=default.dilate,
                       help="grow the latent hole by this many latent pixels (default %(default)s)")
    paper.add_argument("--latent-mask", choices=LATENT_MASK_RULES, default=default.latent_mask,
                       help="how the hole reaches the 8x smaller latent: nearest, the paper's, samples one pixel "
                            "per 8x8 cell and can miss thin strokes; cover takes every cell the hole touches "
                            "(default %(default)s)")
    paper.add_argument("--region", choices=REGIONS, default=default.region,
                       help=f"auto: an image over {FULL_UP_TO} px a side is inpainted in a crop around the hole, at "
                            f"the model's {MODEL_SIDE} px scale, and every other pixel is kept; full: the whole image, "
                            f"as in the paper (default %(default)s)")
    paper.add_argument("--region-margin", type=int, default=default.region_margin,
                       help="with --region auto: pixels of context around the hole, at the model's scale "
                            "(default %(default)s)")
    paper.add_argument("--paste-back", action="store_true",
                       help="put the original known pixels back over the result")
    paper.add_argument("--feather", type=int, default=default.feather,
                       help="with --paste-back: blend over this many pixels (default %(default)s)")
    add_model_options(p, paper)
    ddnm = p.add_argument_group("DDNM only (--method ddnm)")
    ddnm.add_argument("--adm-weights", metavar="FILE",
                      help="guided-diffusion's 256x256_diffusion_uncond.pt (a torch.save of its state dict, read "
                           "without running any of its code) or a .safetensors copy; needed with --method ddnm")
    ddnm.add_argument("--travel-length", type=int, default=ddnm_default.travel_length,
                      help="time travel: jump back this many steps (default %(default)s, hq demo's)")
    ddnm.add_argument("--travel-repeat", type=int, default=ddnm_default.travel_repeat,
                      help="time travel: walk each stretch this many times in all (default %(default)s, hq demo's)")
    p.add_argument("--quiet", action="store_true", help="print errors only")
    # Each group's options start UNSET, so that one given with another group's method is refused.
    groups = {LATENT_METHODS: paper._group_actions, ("ddnm",): ddnm._group_actions}
    args = p.parse_args(argv, argparse.Namespace(**{a.dest: UNSET for g in groups.values() for a in g}))
    for methods, actions in groups.items():
        for action in actions:
            if getattr(args, action.dest) is UNSET:
                setattr(args, action.dest, action.default)
            elif args.method not in methods:
                p.error(f"{action.option_strings[-1]} means nothing with --method {args.method}")
    if args.method == "ddnm" and not args.adm_weights:
        p.error("--method ddnm needs --adm-weights FILE, guided-diffusion's 256x256_diffusion_uncond.pt")
    if args.steps is None:
        args.steps = (ddnm_default if args.method == "ddnm" else default).steps
    return args


def add_model_options(p, paper=None):
    """The options that say which models to load, and where: this command's and app.py's. `paper`:
    the group of the Stable Diffusion checkpoint's own options (default: p)."""
    paper = paper or p
    paper.add_argument("--weights", help="local folder, hub repo id or single .safetensors file (default: "
                                         "$LDM_MIN_WEIGHTS, else CompVis/stable-diffusion-v1-4)")
    paper.add_argument("--tokenizer", help="CLIP tokenizer, a folder or hub repo id, for a single-file --weights "
                                           "(default: CompVis/stable-diffusion-v1-4's, else "
                                           "openai/clip-vit-large-patch14)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 "
                                                   "(auto: float16 on cuda, float32 on cpu)")
    paper.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on CUDA)")


def options_of(args):
    """The run's `Options` (`DdnmOptions` with --method ddnm) from the parsed arguments: an
    out-of-range value is refused here."""
    from ldm_min import Options
    from ldm_min.options import DdnmOptions

    kind = DdnmOptions if args.method == "ddnm" else Options
    return kind(**{field.name: getattr(args, field.name) for field in fields(kind)})


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


def progress(steps, quiet, unit="step"):
    """A callback for sample() (or inpaint_ddnm(), counting its UNet calls): a one-line progress bar on stderr."""
    start = time.perf_counter()

    def show(i, *_):
        if quiet:
            return
        done = i + 1
        per_step = (time.perf_counter() - start) / done
        bar = "#" * (20 * done // steps)
        end = "\n" if done == steps else ""
        print(f"\r{unit} {done}/{steps} [{bar:<20}] {per_step:.2f} s/{unit}", end=end, file=sys.stderr, flush=True)

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
    from ldm_min import images, region
    from jobs import save_atomically
    from ldm_min.pipeline import inpaint_tensors

    if args.quiet:
        warnings.simplefilter("ignore")
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)  # one line, no source
    start = time.perf_counter()
    # Every option and input is checked before the weights load, so a mistake costs no wait
    # (load_models checks --device and --dtype before it reads a file).
    options = options_of(args)
    if Path(args.image).is_dir():
        return batch(args, options)
    out = output_path(args)
    x, hole = images.prepare(images.open_image(args.image), images.open_image(args.mask, "mask"), options.invert_mask)
    if args.method == "ddnm":
        return ddnm_main(args, options, x, hole, out, start)
    box = region.box_for(hole, options)  # for the summary line; inpaint_tensors makes the same choice
    if options.prompt == "auto":
        options = replace(options, prompt=auto_prompt(x, hole, args))
    models = load_method(args)
    result = inpaint_tensors(x, hole, models, options, progress(options.steps, args.quiet))
    save_atomically(images.to_pil(result), out)
    if not args.quiet:
        dtype = str(models.dtype).removeprefix("torch.")
        where = f"{box}, " if box else ""
        method = "blend, " if options.method == "blend" else ""
        print(f"{method}seed {options.seed}, {options.steps} steps, eta {options.eta}, {models.device.type} {dtype}, "
              f"{where}{time.perf_counter() - start:.1f} s -> {out}", file=sys.stderr)


def ddnm_main(args, options, x, hole, out, start):
    """main() with --method ddnm: the same checks first, output and summary line, with the UNet calls
    counted both ways (the windows with a hole left, and all of them as the authors' fork runs them)."""
    from jobs import save_atomically
    from ldm_min import ddnm, images

    calls, every = ddnm.unet_calls(hole, options)  # refuses an image under 256 px before the weights load
    model = load_method(args)
    result = ddnm.inpaint_ddnm(x, hole, model, options, progress(calls, args.quiet, "call"))
    save_atomically(images.to_pil(result), out)
    if not args.quiet:
        weight = next(model.parameters())
        print(f"DDNM, seed {options.seed}, {options.steps} steps: {calls} UNet calls ({every} with every window "
              f"sampled), {weight.device.type} {str(weight.dtype).removeprefix('torch.')}, "
              f"{time.perf_counter() - start:.1f} s -> {out}", file=sys.stderr)


def load_method(args):
    """The models of --method: Stable Diffusion's, or DDNM's ADM."""
    from weights import load_adm, load_models

    if args.method == "ddnm":
        return load_adm(args.adm_weights, args.device, args.dtype)
    return load_models(args.weights, args.device, args.dtype, args.compile, args.tokenizer)


def inpaint_pictures(args, pictures, models, callback):
    """Each (x, hole, options)'s result by --method, or the LdmMinError it failed with."""
    from ldm_min import ddnm
    from ldm_min.pipeline import inpaint_batch

    return (ddnm.inpaint_pictures if args.method == "ddnm" else inpaint_batch)(pictures, models, callback)


def batch_files(args):
    """The (image, mask) pairs of a folder run, sorted by image name, and the output folder: checked
    before any work. An image without a mask (or with several) gets None: it fails alone, later."""
    from ldm_min import InputError

    image_dir, mask, readable = Path(args.image), Path(args.mask), Image.registered_extensions()
    listing = lambda folder: sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = [p for p in listing(image_dir) if p.suffix.lower() in readable]
    if not found:
        raise InputError(f"{image_dir}: no image files in the folder")
    stems = {}
    for p in found:
        if p.stem in stems:
            raise InputError(f"{stems[p.stem].name} and {p.name} would both be written as {p.stem}.png: rename one")
        stems[p.stem] = p
    if mask.is_dir():
        masks = {}
        for p in listing(mask):
            masks.setdefault(p.stem, []).append(p)
        pairs = [(p, masks[p.stem][0] if len(masks.get(p.stem, [])) == 1 else None) for p in found]
    elif mask.is_file():
        pairs = [(p, mask) for p in found]
    else:
        raise InputError(f"mask not found: {mask}")
    out = Path(args.output or f"{image_dir.name}_inpainted")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: a file, but a folder of images makes a folder of results")
    if any(out.resolve() == folder.resolve() for folder in (image_dir, mask)):
        raise InputError(f"output folder {out} is an input folder: refusing to write into it (use -o)")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    return pairs, out


def batch(args, options):
    """Every image of a folder, with its mask, to OUT/<stem>.png: each exactly what the single-image
    command gives with the same options and seed (with --batch N, up to float rounding: up to N images
    of one size go through each UNet call). A rerun skips the images done; under torchrun the images
    are shared out across the processes, a batch at a time (jobs.py, the Table 1 harness's machinery).
    A bad image or mask fails alone, in one line; the run ends with a count and exit status 1."""
    import jobs
    from ldm_min import InputError, LdmMinError, images
    from weights import pick_device

    device, _ = pick_device(args.device, args.dtype)
    pairs, out = batch_files(args)
    output = lambda image: out / f"{image.stem}.png"
    world = jobs.start(device.type)
    try:
        todo = pairs if args.overwrite else jobs.pending(pairs, lambda pair: output(pair[0]), world)
        batches = jobs.batches(todo, args.batch)  # shared out whole: the same batches under any torchrun
        mine = [pair for batch in jobs.share(batches, world.rank, world.size) for pair in batch]

        def read(image, mask):
            if mask is None:
                raise InputError(f"no single mask named {image.stem}.* in {args.mask}")
            return images.prepare(images.open_image(image), images.open_image(mask, "mask"), options.invert_mask)

        failed = {}
        prompts = {}
        # Every caption first: the captioner is freed before the SD weights load (DDNM has no prompt).
        if getattr(options, "prompt", "") == "auto":
            for image, mask in mine:
                try:
                    prompts[image] = auto_prompt(*read(image, mask), args)
                except InputError as e:
                    failed[image] = e
        models = load_method(args) if mine else None
        shown = world.rank == 0 and not args.quiet  # rank 0's progress line, jobs.mine's between batches

        def steps(k):
            """The per-step count, folded into the line of the images' progress."""
            def show(i, *_):
                line = f"images {k}/{len(todo)}, " + (f"call {i + 1}" if args.method == "ddnm" else
                                                      f"step {i + 1}/{options.steps}")
                print(f"\r{line:<{jobs.LINE}}", end="", file=sys.stderr, flush=True)
            return show if shown else None

        def report(image, error):
            failed[image] = error
            print(f"\r{'':<{jobs.LINE}}\rerror: {image.name}: {error}" if shown else f"error: {image.name}: {error}",
                  file=sys.stderr)

        for n, batch in enumerate(jobs.mine(batches, world, "images", args.quiet, size=len)):
            pictures = {}  # image -> (x, hole, its options), for the readable ones
            for image, mask in batch:
                try:
                    if image in failed:
                        raise failed[image]
                    own = replace(options, prompt=prompts[image]) if image in prompts else options
                    pictures[image] = (*read(image, mask), own)
                except LdmMinError as e:
                    report(image, e)
            before = sum(map(len, batches[:n * world.size]))  # the images of every rank's earlier rounds
            for image, result in zip(pictures, inpaint_pictures(args, list(pictures.values()), models,
                                                                     steps(before))):
                if isinstance(result, LdmMinError):
                    report(image, result)
                else:
                    jobs.save_atomically(images.to_pil(result), output(image))
        counts = jobs.gather([(len(mine) - len(failed), len(failed))], world)
    finally:
        jobs.stop(world)
    done, bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if world.rank == 0 and not (args.quiet and not bad):
        skipped = f", {len(pairs) - len(todo)} already there" if len(todo) < len(pairs) else ""
        print(f"{done} done, {bad} failed{': see above' if bad else ''}{skipped} -> {out}", file=sys.stderr)
    if bad:
        sys.exit(1)


OUT_OF_MEMORY = "out of memory: try a smaller image, --dtype bfloat16, or a GPU"


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
        fail(f"error: {OUT_OF_MEMORY}")


if __name__ == "__main__":
    run()
