"""Reproduce the paper's Table 1: FID of centred square holes inpainted with the paper's settings.

    python benchmarks/table1.py --data BSDS500/images/test --dataset bsds500 --out runs/bsds500
    torchrun --nproc_per_node=8 benchmarks/table1.py --data imagenet/val --list imagenet-1k.txt \\
        --dataset imagenet --out runs/imagenet
    python benchmarks/table1.py --data BSDS500/images/test --dataset bsds500 --out runs/bsds500 \\
        --method ddnm --adm-weights 256x256_diffusion_uncond.pt     # the baseline, beside ours

Each image (found recursively under --data, or the ones --list names) is resized so that its short
side is 512 pixels (Pillow's bicubic filter, which antialiases when it shrinks) and centre-cropped to
512x512; each crop is inpainted as ldm_min's `inpaint()` does, with the paper's settings (`Options`),
once per centred square hole of --masks pixels (with --batch N, N jobs through each UNet call, each
within float rounding of its single run: `ldm_min.pipeline.inpaint_batch`). FID (torch-fidelity's
Inception features) compares the inpainted crops with the original crops, per hole size.

Under OUT: settings.json (a rerun must match it), crops/NNNN_<stem>.png, masks/holeS.png (white is
the hole), inpainted/holeS/NNNN_<stem>.png, table1.md and table1.json. With --prompts original and/or
masked, each crop is also inpainted with a BLIP caption as its prompt (guidance 7.5): the caption of
the original crop (the paper's oracle column) or of the crop with the hole hidden from BLIP
(ldm_min.caption), kept in captions/original.json and captions/masked_holeS.json (crop name ->
caption), the results in inpainted/KIND/holeS/. Job k, numbered image by image
and, within an image, in the order of --masks (k = n * len(masks) + j for image NNNN = n and the j-th
size), uses seed `--seed + k`: the result does not depend on how many processes ran it. Every file is
written atomically and a rerun skips the files already there.

With --method ddnm, DDNM (the paper's baseline, `ldm_min.ddnm`, hq demo's settings with T = 25)
inpaints the same crops with the same masks and seeds into inpainted/ddnm/holeS/, in the same OUT:
the table then has both measured rows beside the paper's. With --method blend, the blend of z_t
(`ldm_min.blend`, the classic alternative to eq. 5) does, into inpainted/blend/holeS/, with the
paper's method's weights and `Options` (an OUT holding both must have the same) and each job's seed.

With --protocol authors, the run is Table 1 as its authors' code ran it (github.com/Yus314/SD_uv-nix),
where that differs from the paper's text (docs/table1.md, "The authors' protocol"): each photo squashed
to 512x512, their one-pixel-short black holes (136 and 168 only), E(y) = 0.1825 * posterior mean, their
latent squares as M_l, guidance 7.5 on two empty prompts, and only the hole of D(z_0) pasted into the
masked crop. The noise is theirs too: per hole size one CPU generator seeded with --seed, its draws
running on from image to image in the run's order (--list's order, kept as written, else sorted).
The harness makes E(y) and M_l and calls `sample()` with them; nothing of this enters `Options`.
With --method ddnm, DDNM's inputs are its fork's: the same squashed crops, the centred hole.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
import inpaint as cli  # noqa: E402
import jobs  # noqa: E402
import weights  # noqa: E402
from ldm_min import InputError, Options, WeightsError, images  # noqa: E402
from ldm_min import ddnm  # noqa: E402
from ldm_min.caption import caption_tensors  # noqa: E402
from ldm_min.options import LATENT_METHODS, DdnmOptions, check_seed  # noqa: E402
from ldm_min.pipeline import check_finite, inpaint_batch, unet_eps  # noqa: E402
from ldm_min.sample import sample  # noqa: E402
from weights import DEFAULT_CAPTIONER, DEFAULT_REPO, load_adm, load_models, pick_device  # noqa: E402

SIDE = 512  # the crop, the model's native size
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# The paper's Table 1, FID, per dataset and hole side: (DDNM, the paper's proposed method).
PAPER = {"bsds500": {168: (59.54, 56.57), 136: (43.83, 39.90)},
         "imagenet": {168: (35.63, 29.43), 136: (22.82, 20.49)},
         "imagenet-o": {168: (36.80, 29.05), 136: (25.25, 20.40)}}
# The paper's 3rd column: the proposed method with the BLIP caption of the original as the prompt.
PAPER_CAPTION = {"bsds500": {168: 51.05, 136: 37.33}, "imagenet": {168: 27.82, 136: 21.18},
                 "imagenet-o": {168: 32.20, 136: 23.54}}
# Where a job's prompt comes from: none (the paper's Table 1), the caption of the original crop (the
# paper's oracle), the caption of the masked crop (what a user has: the paper's future work).
PROMPT_KINDS = ("none", "original", "masked")
DATASET_NAMES = {"bsds500": "BSDS500", "imagenet": "ImageNet-1k", "imagenet-o": "ImageNet-O", "other": "other"}

# --protocol: "paper", the paper's text; "authors", their code's (Yus314/SD_uv-nix, each constant from the
# file named beside it), which made the paper's "proposed" row.
PROTOCOLS = ("paper", "authors")
AUTHORS_LATENT_HOLES = {136: (23, 41), 168: (20, 44)}  # config.py latent_mask_min, _max: M_l's [min, max) squared
AUTHORS_ENCODE_SCALE = 0.1825   # process.py: latents_y = 0.1825 * posterior mean (SD's factor is 0.18215)
AUTHORS_DECODE_SCALE = 0.18215  # sampler.py: latents = 1 / 0.18215 * latents, then the decoder
AUTHORS_GUIDANCE = 7.5          # config.py guidance_scale, applied to two empty prompts (util.gen_text_embeddings)


def mask_sizes(text):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--masks takes sizes in pixels separated by commas, got {text!r}") from None
    for s in sizes:
        if not 0 < s < SIDE:
            raise argparse.ArgumentTypeError(f"a hole must be between 1 and {SIDE - 1} pixels a side, got {s}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"--masks names a size twice: {text}")
    return sizes


def prompt_kinds(text):
    kinds = text.split(",")
    for k in kinds:
        if k not in PROMPT_KINDS:
            raise argparse.ArgumentTypeError(f"--prompts takes {', '.join(PROMPT_KINDS)} separated by commas, "
                                             f"got {k!r}")
    if len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"--prompts names a kind twice: {text}")
    return kinds


def parse_args(argv):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images, searched recursively")
    p.add_argument("--list", help="text file naming the images to use, one path relative to --data a line")
    p.add_argument("--dataset", choices=DATASET_NAMES, default="other",
                   help="which of the paper's sets this is, for its numbers beside ours (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder; a rerun with the same settings resumes it")
    p.add_argument("--method", choices=cli.METHODS, default="paper",
                   help="paper: the paper's method; blend: the blend of z_t in place of eq. 5, into inpainted/blend/; "
                        "ddnm: DDNM, its baseline, into inpainted/ddnm/ (default %(default)s)")
    p.add_argument("--adm-weights", metavar="FILE",
                   help="with --method ddnm: guided-diffusion's 256x256_diffusion_uncond.pt (or a .safetensors copy)")
    p.add_argument("--weights", help="local folder, hub repo id or single .safetensors file (default: "
                                     f"$LDM_MIN_WEIGHTS, else {DEFAULT_REPO})")
    p.add_argument("--tokenizer", help="CLIP tokenizer (folder or hub repo id) for a single-file --weights")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by path), for a quick look")
    p.add_argument("--masks", type=mask_sizes, default=[168, 136], help="hole sides in pixels (default 168,136)")
    p.add_argument("--steps", type=int, help=f"DDIM steps (default {Options().steps}, the paper's), or DDNM's "
                                              f"(default {DdnmOptions().steps}, the paper's for DDNM)")
    p.add_argument("--seed", type=int, default=0, help="job k uses seed SEED + k (default %(default)s)")
    p.add_argument("--batch", type=cli.batch_size, default=1, metavar="N",
                   help="inpaint N jobs together, through each UNet call (default %(default)s); each result is the "
                        "single job's, up to float rounding")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (auto: float16 on cuda)")
    p.add_argument("--prompts", type=prompt_kinds, default=["none"],
                   help="none (the paper's), original (BLIP caption of the original crop, the paper's oracle column), "
                        "masked (BLIP caption of the crop with the hole hidden), separated by commas (default none)")
    p.add_argument("--captioner", help=f"BLIP captioner, local folder or hub repo id (default {DEFAULT_CAPTIONER})")
    p.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                   help="paper: the paper's text; authors: Table 1 as the authors' code ran it (docs/table1.md), "
                        "holes 136 and 168 only (default %(default)s)")
    p.add_argument("--no-fid", action="store_true", help="inpaint only: no Inception weights needed")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    # Each method's own options are refused with the others, in one line (as inpaint.py does). The
    # blend's row is Table 1's, without prompts: the caption columns are the paper's method's only.
    own = {("ddnm",): [("--adm-weights", args.adm_weights)],
           LATENT_METHODS: [("--weights", args.weights), ("--tokenizer", args.tokenizer), ("--batch", args.batch != 1)],
           ("paper",): [("--captioner", args.captioner), ("--prompts", args.prompts != ["none"])]}
    for methods, options in own.items():
        for flag, value in options:
            if value and args.method not in methods:
                p.error(f"{flag} means nothing with --method {args.method}")
    if args.protocol == "authors":  # their code has the paper's method and its baseline, without captions
        if args.method == "blend":
            p.error("--method blend means nothing with --protocol authors: their code runs eq. 5 only")
        if args.prompts != ["none"]:
            p.error("--prompts means nothing with --protocol authors: their Table 1 run had no prompt")
        odd = [s for s in args.masks if s not in AUTHORS_LATENT_HOLES]
        if odd:
            p.error(f"--protocol authors takes holes of {' and '.join(map(str, AUTHORS_LATENT_HOLES))} only: their "
                    f"config.py sets latent squares for these, and has no rule for {odd[0]}")
    if args.method == "ddnm" and not args.adm_weights:
        p.error("--method ddnm needs --adm-weights FILE, guided-diffusion's 256x256_diffusion_uncond.pt")
    if args.steps is None:
        args.steps = (DdnmOptions() if args.method == "ddnm" else Options()).steps
    return args


def find_images(data, list_file, out, keep_order=False):
    """The images of the run, as paths relative to `data`, sorted: every image file under `data`
    (not under `out`), or those `list_file` names (blank lines and lines starting with # ignored),
    in the file's order if `keep_order` (each name once)."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"--data {data}: not a folder")
    if list_file:
        try:
            lines = Path(list_file).read_text().splitlines()
        except OSError as e:
            raise InputError(f"--list {list_file}: cannot read it ({e.strerror})") from None
        names = list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))
        if not keep_order:
            names.sort()
        missing = [n for n in names if not (data / n).is_file()]
        if missing:
            raise InputError(f"--list {list_file}: {len(missing)} of {len(names)} files are not under {data}, "
                             f"e.g. {missing[0]}")
    else:
        out = Path(out).resolve()
        names = sorted(p.relative_to(data).as_posix() for p in data.rglob("*")
                       if p.suffix.lower() in EXTENSIONS and p.is_file() and out not in p.resolve().parents)
    if not names:
        raise InputError(f"no images in {list_file or data} (looked for {', '.join(sorted(EXTENSIONS))})")
    return names


def centre_crop(image):
    """The protocol's crop: resize so that the short side is 512 (Pillow bicubic), centre 512x512."""
    image = images.eight_bit(image).convert("RGB")
    w, h = image.size
    scale = SIDE / min(w, h)
    size = (SIDE, max(SIDE, round(h * scale))) if w <= h else (max(SIDE, round(w * scale)), SIDE)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - SIDE) // 2, (size[1] - SIDE) // 2
    return image.crop((left, top, left + SIDE, top + SIDE))


def squash(image):
    """The authors' 512x512 (util.py load_image, make_masked_dataset.py: `Image.open(p).convert("RGB")
    .resize((512, 512))`): the photo as stored (no EXIF rotation), resized whole, its shape lost, with
    Pillow's default filter, bicubic (which antialiases when it shrinks)."""
    return image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def hole_rows(side, holes="paper"):
    """The rows (and columns) of the hole of side `side` in a 512 crop. "paper": centred, side pixels
    from (512 - side) // 2. "authors": their config.py get_mask_range, [256 - side // 2, 256 + side // 2
    - 1), one pixel short: 135 pixels for 136 (their folders say "_135"), 167 for 168."""
    if holes == "authors":
        return slice(SIDE // 2 - side // 2, SIDE // 2 + side // 2 - 1)
    a = (SIDE - side) // 2
    return slice(a, a + side)


def hole_mask(side, holes="paper"):
    """512x512, white (255) on the square hole of `hole_rows(side, holes)`."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[hole_rows(side, holes), hole_rows(side, holes)] = 255
    return Image.fromarray(mask)


def holes_of(args):
    """Whose holes a run cuts: the authors' SD code's under --protocol authors, but for DDNM, whose
    fork masks the centred square as the paper does (its center_mask_512x512.png: 168 pixels at 172)."""
    return "authors" if args.protocol == "authors" and args.method != "ddnm" else "paper"


class NoiseStream:
    """The authors' noise for one hole size. Their process.py seeds torch's CPU generator once a run
    (torch.manual_seed(18); one run per hole size) and draws z_T and then, in sampler.py, one eps_z a
    step from it, the last step's included, image after image: each image takes `per_image` float32
    numbers on from where the last one stopped. `at(n)` gives a generator where image n's draws start,
    found from n alone, so that resuming, torchrun and --batch give each image the same draws: the
    stream is walked forward to n by drawing each skipped image's numbers in one randn and dropping
    them (the generator makes the same numbers, one 32-bit output each, whatever the split into
    draws, as long as each draw's size is a multiple of 16: a latent's 4 x 64 x 64 is). A process
    asks for its images in increasing order, so it walks the stream once: about 2 ms an image on a
    CPU, linear in the run's length."""

    def __init__(self, seed, per_image):
        self.seed, self.per_image = seed, per_image
        self.generator, self.image = torch.Generator().manual_seed(seed), 0

    def at(self, n):
        if n < self.image:  # behind: walk again from the start
            self.generator, self.image = torch.Generator().manual_seed(self.seed), 0
        for _ in range(n - self.image):
            torch.randn(self.per_image, generator=self.generator)
        self.image = n
        copy = torch.Generator()  # image n draws from its own copy: the stream stays where n starts
        copy.set_state(self.generator.get_state())
        return copy


def authors_eps(models, batch):
    """eps_theta as their sampler.py computes it for `batch` images: classifier-free guidance 7.5
    with both prompts empty, so a batch of twice the images through the UNet at every step, where
    ldm_min makes one pass (docs/table1.md: what that costs)."""
    context = models.encode_text("").expand(2 * batch, -1, -1)  # [unconditional, conditional]: "" and ""
    return unet_eps(models, context, AUTHORS_GUIDANCE)


@torch.no_grad()
def authors_inpaint(crops, sides, generators, models, steps):
    """Their process.py and sampler.py for a batch of squashed crops (uint8 arrays, 512x512x3), each
    with its hole size and the generator of its draws (`NoiseStream.at`): the arithmetic in their
    order where it shows in the pixels. Returns uint8 arrays: each masked crop, black in the hole,
    with the hole's pixels of D(z_0) pasted in; everything outside the hole is the crop's."""
    masked, Ey, M_l = [], [], []
    for crop, side in zip(crops, sides):
        rows = hole_rows(side, "authors")
        y = crop.copy()
        y[rows, rows] = 0                                                 # the hole black (process.py)
        masked.append(y)
        y = torch.from_numpy(y).permute(2, 0, 1)[None].float() / 255     # torchvision's to_tensor: [0, 1]
        mean = models.vae.encode((2 * y - 1).to(models.device, models.dtype)).float() / models.vae.scaling_factor
        Ey.append(AUTHORS_ENCODE_SCALE * mean)                           # E(y), their factor
        low, high = AUTHORS_LATENT_HOLES[side]
        known = torch.ones(1, 1, SIDE // 8, SIDE // 8, device=models.device)
        known[..., low:high, low:high] = 0                               # M_l: inpainting.py create_mask
        M_l.append(known)
    rescale = models.vae.scaling_factor / AUTHORS_DECODE_SCALE           # decode() divides by the checkpoint's
    D = lambda z: torch.cat([models.vae.decode((z_k * rescale).to(models.dtype)).float() for z_k in z.split(1)])
    x0s = sample(authors_eps(models, len(crops)), torch.cat(Ey), torch.cat(M_l), D, models.schedule, T=steps,
                 eta=Options().eta, seed=generators)                     # eta 0.85: config.py's and the paper's
    results = []
    for y, x0, side in zip(masked, x0s.split(1), sides):
        check_finite(x0, models)                                         # as every result is
        pixels = ((x0[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        rows = hole_rows(side, "authors")
        y[rows, rows] = pixels[rows, rows]                               # only the hole pasted (process.py)
        results.append(y)
    return results


class Layout:
    """Where each file of a run lives under OUT."""

    def __init__(self, out, names):
        self.out, self.names = Path(out), names

    def crop(self, n):
        return self.out / "crops" / f"{n:04d}_{Path(self.names[n]).stem}.png"

    def mask(self, side, holes="paper"):
        """The centred hole's mask, or the authors' (`hole_rows`) beside it."""
        return self.out / "masks" / (f"hole{side}.png" if holes == "paper" else f"authors_hole{side}.png")

    def result(self, n, side, kind="none"):
        folder = self.out / "inpainted" if kind == "none" else self.out / "inpainted" / kind  # none: as before captions
        return folder / f"hole{side}" / self.crop(n).name

    def captions(self, kind, side):
        """original: one caption per image; masked: one per image and hole size."""
        return self.out / "captions" / ("original.json" if kind == "original" else f"masked_hole{side}.json")


def settings_of(args, names, device, dtype):
    """The run's settings: the protocol's (images, masks, seeds, device), then its method's own: the
    SD weights and `Options` for the paper's method and the blend (with "blend": true for the
    blend), the ADM's file and `DdnmOptions` for DDNM."""
    settings = {"images": len(names), "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
                "masks": args.masks, "seed": args.seed, "device": device.type,
                "dtype": str(dtype).removeprefix("torch.")}
    if args.protocol != "paper":  # absent: the paper's, and settings.json is as before the option
        settings["protocol"] = args.protocol
    for seed in (args.seed, args.seed + len(names) * len(args.masks) - 1):  # the first job's and the last's
        check_seed(seed)
    if args.method == "ddnm":
        options = {k: v for k, v in asdict(DdnmOptions(steps=args.steps)).items() if k != "seed"}
        return settings | {"ddnm": {"adm_weights": str(Path(args.adm_weights).resolve()), **options}}
    weights = args.weights or os.environ.get("LDM_MIN_WEIGHTS") or DEFAULT_REPO
    if Path(weights).exists():
        weights = str(Path(weights).resolve())
    options = {k: v for k, v in asdict(Options(steps=args.steps)).items() if k not in ("seed", "method")}
    settings |= {"weights": weights, "options": options}
    if args.method == "blend":  # the same weights and options as the paper's method: nothing favours either
        settings["blend"] = True
    if args.prompts != ["none"]:  # absent: the prompt kinds are ["none"], and settings.json is as before captions
        captioner = str(args.captioner or DEFAULT_CAPTIONER)
        settings |= {"prompts": args.prompts, "captioner": str(Path(captioner).resolve()) if Path(captioner).is_dir()
                     else captioner}
    return settings


# Prompt kinds and methods may be added to a run (each has its own files); the other settings must match.
ADDITIVE = ("prompts", "captioner")
METHOD_SETTINGS = ("weights", "options", "ddnm", "blend")  # the paper's method's (and the blend's), DDNM's


def check_settings(out, settings):
    """OUT holds this run's settings, or none yet. Only reads: checked before anything is written.
    Returns the settings to keep in settings.json: the saved ones with this run's prompt kinds, or
    its method's settings, added."""
    path = Path(out) / "settings.json"
    if not path.exists():
        return settings
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}): use another --out") from None
    flat = lambda d: {"protocol": "paper", **{k: v for k, v in d.items() if k not in (*METHOD_SETTINGS, *ADDITIVE)},
                      **{k: d[k] for k in ("weights",) if k in d}, **d.get("options", {}),
                      **{f"ddnm {k}": v for k, v in d.get("ddnm", {}).items()}}
    for key, value in flat(settings).items():
        if key in flat(saved) and flat(saved)[key] != value:  # a key not there: a method new to this OUT
            raise InputError(f"{out} holds another run's outputs (settings.json: {key} {flat(saved)[key]!r}, here "
                             f"{value!r}): use another --out, or the same settings to resume it")
    if "captioner" in saved and "captioner" in settings and saved["captioner"] != settings["captioner"]:
        raise InputError(f"{out} holds captions of another captioner (settings.json: captioner {saved['captioner']!r}, "
                         f"here {settings['captioner']!r}): use another --out, or the same --captioner")
    saved = {**saved, **{k: settings[k] for k in METHOD_SETTINGS if k in settings and k not in saved}}
    kinds = list(saved.get("prompts", ["none"]))
    kinds += [k for k in settings.get("prompts", ["none"]) if k not in kinds]
    if kinds == saved.get("prompts", ["none"]):
        return saved
    return {**saved, "prompts": kinds, "captioner": saved.get("captioner", settings.get("captioner"))}


# FID with torch-fidelity's InceptionV3: a port of the TensorFlow FID network, its resizing included.
def inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3. Its module needs only torch, but the package's
    __init__ also loads the other metrics, which import torchvision; where torchvision is missing or
    cannot load (PyPI's CUDA build beside a CPU-only PyTorch), the module is loaded without that __init__."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            raise InputError("FID needs torch-fidelity: pip install -r requirements-eval.txt, or use --no-fid") from None
    except (ImportError, RuntimeError):  # torchvision, imported by the package's __init__
        pass
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def inception_weights_file():
    """Where torch-fidelity keeps its Inception weights: torch hub's cache, $TORCH_HOME/hub/checkpoints."""
    import torch_fidelity.feature_extractor_inceptionv3 as module  # after inception_class()
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(module.URL_INCEPTION_V3)


def load_inception(device):
    """The Inception network (2048-d pool features) with torch-fidelity's weights file, read from torch
    hub's cache; one line saying where the file goes when it is not there (nothing is downloaded here, so
    a machine without network fails at once rather than after the inpainting)."""
    Inception = inception_class()
    path = inception_weights_file()
    if not path.is_file():
        url = sys.modules[Inception.__module__].URL_INCEPTION_V3
        raise WeightsError(f"the FID Inception weights are not in {path.parent} (TORCH_HOME moves it): download {url} "
                           f"there, or use --no-fid")
    try:
        model = Inception("inception-v3-compat", ["2048"], str(path))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"the FID Inception weights {path} cannot be loaded: {str(e).splitlines()[0][:120]}") from None
    return model.to(device)


@torch.no_grad()
def inception_features(model, paths, device, batch=50):
    """(N, 2048) float64 pool features. The images go in as torch-fidelity takes them: uint8 RGB."""
    feats = []
    for i in range(0, len(paths), batch):
        x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
        feats.append(model(torch.from_numpy(x).permute(0, 3, 1, 2).to(device))[0].cpu())
    return torch.cat(feats).double().numpy()


def statistics(features):
    """Mean and covariance (normalised by N - 1) of (N, d) features."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu_a, cov_a, mu_b, cov_b):
    """Squared Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    |mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)). The eigenvalues of cov_a cov_b
    are those of cov_a^(1/2) cov_b cov_a^(1/2), real and >= 0, so the trace of the root is the sum of
    their roots (rounding can leave them slightly negative or complex: those parts are dropped)."""
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    d = mu_a - mu_b
    return float(d @ d + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eigenvalues).sum())


def fid(features_a, features_b):
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def table(rows, dataset):
    """The Markdown table; with caption prompts (rows with a "prompt"), a prompt column and the
    paper's caption column."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    columns = {"dataset": lambda r: DATASET_NAMES[dataset], "hole": lambda r: f"{r['hole']}x{r['hole']}",
               "prompt": lambda r: r["prompt"], "images": lambda r: r["images"],
               "DDNM (paper)": lambda r: fmt(r["paper_ddnm"]), "proposed (paper)": lambda r: fmt(r["paper_proposed"]),
               "+ caption of the original (paper)": lambda r: fmt(r["paper_caption"]),
               "ours": lambda r: fmt(r["fid"]), "DDNM (measured)": lambda r: fmt(r["ddnm_fid"]),
               "blend (measured)": lambda r: fmt(r["blend_fid"]), "s/image": lambda r: fmt(r["seconds_per_image"]),
               "DDNM s/image": lambda r: fmt(r["ddnm_seconds_per_image"]),
               "blend s/image": lambda r: fmt(r["blend_seconds_per_image"]),
               "DDNM UNet calls": lambda r: "{} (all windows: {})".format(*r["ddnm_unet_calls"]),
               "device": lambda r: r["device"]}
    if "prompt" not in rows[0]:  # the paper's Table 1 alone
        del columns["prompt"], columns["+ caption of the original (paper)"]
    if "ddnm_fid" not in rows[0]:  # no DDNM run in OUT
        del columns["DDNM (measured)"], columns["DDNM s/image"], columns["DDNM UNet calls"]
    if "blend_fid" not in rows[0]:  # no blend run in OUT
        del columns["blend (measured)"], columns["blend s/image"]
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |\n"
    return line(columns) + "|---" * len(columns) + "|\n" + "".join(line(f(r) for f in columns.values()) for r in rows)


def make_captions(args, world, layout, names):
    """The caption of each crop for each caption kind of --prompts, in captions/*.json: rank 0 writes
    the missing ones (loading the captioner only then, and freeing it after) while the other ranks
    wait at the barrier. Returns {(kind, side): {crop name: caption}} for every rank."""
    wanted = [(kind, side) for kind in args.prompts if kind != "none" for side in args.masks]
    if not wanted:
        return {}
    if world.rank == 0:
        (layout.out / "captions").mkdir(exist_ok=True)
        captioner = None
        for kind, side in wanted:
            path = layout.captions(kind, side)
            known = json.loads(path.read_text()) if path.exists() else {}
            missing = [n for n in range(len(names)) if layout.crop(n).name not in known]
            if not missing:
                continue
            if captioner is None:
                captioner = weights.load_captioner(args.captioner, args.device, args.dtype)
            for n in jobs.mine(missing, jobs.World(), f"captions {path.stem}", args.quiet):
                with Image.open(layout.crop(n)) as crop, Image.open(layout.mask(side)) as mask:
                    x, hole = images.prepare(crop, mask)
                # original: nothing hidden (fill_from_known leaves x whole); masked: the hole never reaches BLIP
                known[layout.crop(n).name] = caption_tensors(x, hole if kind == "masked" else torch.zeros_like(hole),
                                                             captioner)
                jobs.write_json_atomically(dict(sorted(known.items())), path)  # a stop loses one caption at most
        del captioner  # before the SD models load
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    jobs.barrier(world)
    return {(kind, side): json.loads(layout.captions(kind, side).read_text()) for kind, side in wanted}


def main(argv=None):
    args = parse_args(argv)
    device, dtype = pick_device(args.device, args.dtype)  # checked before anything is read or written
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: a file, not a folder")
    all_names = find_images(args.data, args.list, out, keep_order=args.protocol == "authors")
    names = all_names[:args.limit] if args.limit else all_names
    world = jobs.start(device.type)
    try:
        run_jobs(args, world, device, dtype, out, all_names, names)
    finally:
        jobs.stop(world)


def run_jobs(args, world, device, dtype, out, all_names, names):
    settings = check_settings(out, settings_of(args, all_names, device, dtype))
    inception = load_inception(device) if world.rank == 0 and not args.no_fid else None  # fail before the work
    layout = Layout(out, all_names)
    kinds = args.prompts if args.method == "paper" else [args.method]  # DDNM's: inpainted/ddnm/holeS/, ...
    if world.rank == 0:
        for folder in ["crops", "masks"]:
            (out / folder).mkdir(parents=True, exist_ok=True)
        for kind in kinds:
            for side in args.masks:
                layout.result(0, side, kind).parent.mkdir(parents=True, exist_ok=True)
        saved = out / "settings.json"
        if not saved.exists() or json.loads(saved.read_text()) != settings:  # new, or prompt kinds added
            jobs.write_json_atomically(settings, saved)
    jobs.barrier(world)

    # The crops, and the masks (rank 0), each written once.
    holes = holes_of(args)
    if world.rank == 0:
        for side in args.masks:
            if not jobs.done(layout.mask(side, holes)):
                jobs.save_atomically(hole_mask(side, holes), layout.mask(side, holes))
    authors = args.protocol == "authors"
    todo = jobs.pending(range(len(names)), layout.crop, world)
    for n in jobs.mine(todo, world, "crops", args.quiet):
        photo = images.open_image(Path(args.data) / names[n], upright=not authors)  # theirs: as stored
        jobs.save_atomically((squash if authors else centre_crop)(photo), layout.crop(n))

    captions = make_captions(args, world, layout, names)

    # The inpainting: job k = (image n, j-th hole size), seed + k, the same seed for every prompt kind and method.
    cases = [(n, j, side, kind) for kind in kinds for n in range(len(names))
             for j, side in enumerate(args.masks)]
    todo = jobs.pending(cases, lambda case: layout.result(case[0], case[2], case[3]), world)
    seconds = []
    if todo:
        if args.method == "ddnm":
            models = load_adm(args.adm_weights, args.device, args.dtype)
        else:
            models = load_models(args.weights, args.device, args.dtype, tokenizer=args.tokenizer)
        if authors and args.method == "paper":  # their noise, a stream per hole size: z_T and T eps_z an image
            latent = models.unet.conv_in.in_channels * (SIDE // 8) ** 2
            streams = {side: NoiseStream(args.seed, (1 + args.steps) * latent) for side in args.masks}
        for batch in jobs.mine(jobs.batches(todo, args.batch), world, "inpainting", args.quiet, size=len):
            start = time.perf_counter()
            if authors and args.method == "paper":
                crops = [np.array(Image.open(layout.crop(n)).convert("RGB")) for n, j, side, kind in batch]
                results = [Image.fromarray(result) for result in authors_inpaint(
                    crops, [side for n, j, side, kind in batch], [streams[side].at(n) for n, j, side, kind in batch],
                    models, args.steps)]
            else:
                pictures = []
                for n, j, side, kind in batch:
                    seed = args.seed + n * len(args.masks) + j
                    if kind == "ddnm":
                        options = DdnmOptions(steps=args.steps, seed=seed)
                    elif kind == "blend":
                        options = Options(method="blend", steps=args.steps, seed=seed)
                    else:
                        prompt = "" if kind == "none" else captions[kind, side][layout.crop(n).name]
                        options = Options(prompt=prompt, steps=args.steps, seed=seed)
                    with Image.open(layout.crop(n)) as crop, Image.open(layout.mask(side, holes)) as mask:
                        pictures.append((*images.prepare(crop, mask), options))
                results = [r if isinstance(r, Exception) else images.to_pil(r) for r in
                           (ddnm.inpaint_pictures if args.method == "ddnm" else inpaint_batch)(pictures, models)]
            for (n, j, side, kind), result in zip(batch, results):
                if not isinstance(result, Exception):
                    jobs.save_atomically(result, layout.result(n, side, kind))
            seconds += [(side, kind, (time.perf_counter() - start) / len(batch)) for n, j, side, kind in batch]
            failure = next((r for r in results if isinstance(r, Exception)), None)
            if failure:  # it stops the run, as a single job's does, with the batch's other results kept
                raise failure
    seconds = jobs.gather(seconds, world)
    if world.rank == 0:
        report(args, out, names, layout, inception, seconds, device, dtype, world, settings)


def report(args, out, names, layout, inception, seconds, device, dtype, world, settings):
    """FID per hole size, the table on stdout, OUT/table1.md and OUT/table1.json. A method's FID is
    there once all its results are; DDNM's columns once OUT holds a DDNM run, the blend's once it
    holds a blend run."""
    previous = {}
    if (out / "table1.json").exists():  # a rerun with nothing left to inpaint keeps the timings it had
        try:
            previous = {(r["hole"], r.get("prompt", "none")): r
                        for r in json.loads((out / "table1.json").read_text())["rows"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    where = f"{device.type} {str(dtype).removeprefix('torch.')}"
    if device.type == "cuda":
        where += f" {torch.cuda.get_device_name(device)}"
    crops = [layout.crop(n) for n in range(len(names))]
    real = inception_features(inception, crops, device) if inception is not None else None

    def measured(side, kind, row_kind):
        """FID of one method's (or prompt kind's) results, their seconds per image (this run's, or
        those the previous table has in its row of `row_kind`), and whether this run timed them."""
        results = [layout.result(n, side, kind) for n in range(len(names))]
        times = [s for size, k, s in seconds if size == side and k == kind]
        score = None
        if real is not None and len(names) >= 2 and all(map(jobs.done, results)):
            score = fid(inception_features(inception, results, device), real)
        key = f"{kind}_seconds_per_image" if kind in ("ddnm", "blend") else "seconds_per_image"
        return score, sum(times) / len(times) if times else previous.get((side, row_kind), {}).get(key), bool(times)

    rows = []
    for side in args.masks:
        for kind in args.prompts:
            score, per_image, timed = measured(side, kind, kind)
            old = previous.get((side, kind), {})
            paper_ddnm, proposed = PAPER.get(args.dataset, {}).get(side, (None, None))
            row = {"hole": side, "images": len(names), "paper_ddnm": paper_ddnm, "paper_proposed": proposed,
                   "fid": score, "seconds_per_image": per_image, "device": old.get("device", where)}
            for method in ("ddnm", "blend"):  # each beside ours, once OUT holds its run: its FID and time a picture
                if settings.get(method):
                    method_score, method_per_image, method_timed = measured(side, method, kind)
                    row |= {f"{method}_fid": method_score, f"{method}_seconds_per_image": method_per_image}
                    timed = timed or method_timed
            if "ddnm" in settings:  # and DDNM's UNet calls a picture (and the fork's)
                hole = torch.from_numpy(np.asarray(hole_mask(side)) >= 128).float()[None, None]
                options = DdnmOptions(**{k: v for k, v in settings["ddnm"].items() if k != "adm_weights"})
                row["ddnm_unet_calls"] = list(ddnm.unet_calls(hole, options))
            if timed:
                row["device"] = f"{where} x{world.size}"
            if args.prompts != ["none"]:  # as before captions otherwise
                paper = PAPER_CAPTION.get(args.dataset, {}).get(side) if kind == "original" else None
                row = {"hole": side, "prompt": kind, **row, "paper_caption": paper}
            rows.append(row)
    text = table(rows, args.dataset)
    print(text, end="")
    jobs.write_text_atomically(text, out / "table1.md")
    steps = {"steps": settings.get("options", {}).get("steps"), "ddnm_steps": settings.get("ddnm", {}).get("steps")}
    jobs.write_json_atomically({"dataset": args.dataset, **steps, "rows": rows}, out / "table1.json")


def run(argv=None):
    """main() with every expected failure as one line on stderr and exit status 2, as inpaint.py does."""
    cli.run(argv, main, "interrupted: the outputs written so far are kept; run the same command again to finish")


if __name__ == "__main__":
    run()
