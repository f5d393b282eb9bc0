"""Every step from a `--weights` value to models ready to sample with: find, download, read the
configs, choose device and dtype, build the modules, load them strictly, speed them up.

`--weights` names a local folder in the official layout or a hub repo id (default
CompVis/stable-diffusion-v1-4; the environment variable LDM_MIN_WEIGHTS overrides the
default). Only safetensors files are read: pickles (.bin, .ckpt) can run code when opened.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_min import fast
from ldm_min.errors import InputError, WeightsError
from ldm_min.models import Models
from ldm_min.schedule import Schedule
from ldm_min.unet import UNet
from ldm_min.vae import VAE

DEFAULT_REPO = "CompVis/stable-diffusion-v1-4"
SD14_CONFIGS = Path(__file__).parent / "ldm_min" / "sd14"  # the official v1.4 config.json files
PARTS = ("unet", "vae", "text_encoder", "scheduler")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIG_FILES = ["scheduler/scheduler_config.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/*"]

# The declared renames, file name -> module name. Nothing else is renamed.
RENAMES = {
    "vae": [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")],
    "text_encoder": [("text_model.", "")],  # files written before transformers 5 carry this prefix
}
IGNORED = {"text_encoder": {"embeddings.position_ids"}}  # a constant int64 buffer, rebuilt below

# What this code implements: the Stable Diffusion v1 UNet and VAE. Other families differ here.
SD1_UNET = {"in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
            "use_linear_projection": False, "addition_embed_type": None, "class_embed_type": None,
            "transformer_layers_per_block": 1}
SD1_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}


def pick_device(device="auto", dtype="auto"):
    """`auto`: CUDA in float16 when there is a GPU, else the CPU in float32."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise InputError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    if device == "cpu" and dtype == "float16":
        raise InputError("float16 on the CPU is slow and partly unsupported: use --dtype bfloat16 or float32")
    return torch.device(device), getattr(torch, dtype)


def variants(dtype):
    """Weight-file suffixes in order of preference: the .fp16 variant for float16, else the plain file."""
    return [".fp16", ""] if dtype == torch.float16 else ["", ".fp16"]


def hub_patterns(variant):
    """The files to fetch from a hub repo: configs, tokenizer and each part's weights in one variant."""
    return CONFIG_FILES + [f"{part}/{stem}{variant}.safetensors" for part, stem in WEIGHT_STEMS.items()]


def resolve(weights, dtype):
    """A local folder in the official layout for `weights` (a folder or a hub repo id)."""
    weights = str(weights or os.environ.get("LDM_MIN_WEIGHTS") or DEFAULT_REPO)
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"--weights {weights}: expected a folder in the Stable Diffusion layout (unet/, vae/, "
                           f"text_encoder/, tokenizer/, scheduler/), got a file")
    if not is_repo_id(weights):
        raise WeightsError(f"--weights {weights}: no such folder")
    return download(weights, dtype)


def is_repo_id(name):
    """"owner/name" as the hub spells repo ids, and not a path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def reason(e):
    """The first line of an exception, for a one-line message."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}"


def download(repo, dtype):
    """Fetch only what `load_models` reads into huggingface-hub's cache; the preferred variant first."""
    from huggingface_hub import snapshot_download

    try:
        for variant in variants(dtype):
            folder = Path(snapshot_download(repo, allow_patterns=hub_patterns(variant)))
            if all(find_weights(folder, part, dtype, required=False) for part in WEIGHT_STEMS):
                return folder
        return folder
    except Exception as e:  # network, authorisation, offline mode: all end in the same advice
        raise WeightsError(
            f"could not get the weights of {repo} from the hub ({reason(e)}). Accept the licence "
            f"at https://huggingface.co/{repo}, log in with `hf auth login` (or set HF_TOKEN) and run again with "
            f"network access, or pass --weights PATH to a local copy in the official layout") from None


def find_weights(folder, part, dtype, required=True):
    """The part's safetensors file, the variant that matches dtype first."""
    stem = WEIGHT_STEMS[part]
    for variant in variants(dtype):
        if (folder / part / f"{stem}{variant}.safetensors").is_file():
            return folder / part / f"{stem}{variant}.safetensors"
    if not required:
        return None
    pickles = sorted(p.name for p in (folder / part).glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    pickles += sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise WeightsError(f"{folder / part}: found only {', '.join(pickles)}; ldm_min reads safetensors files "
                           f"only (pickle files can run code when opened): get {stem}.safetensors")
    raise WeightsError(f"{folder / part}: missing {stem}.safetensors (or {stem}.fp16.safetensors)")


def read_configs(folder=None):
    """Each part's config: the official v1.4 values, overridden by what `folder/<part>/` holds."""
    configs = {part: json.loads((SD14_CONFIGS / f"{part}.json").read_text()) for part in PARTS}
    if folder is not None:
        for part in PARTS:
            name = "scheduler_config.json" if part == "scheduler" else "config.json"
            configs[part].update(json.loads((Path(folder) / part / name).read_text()))
    return configs


def check_family(configs, folder):
    """One clear line when the configs describe another model family (SD 2.x, SDXL, inpainting UNets)."""
    unet, text = configs["unet"], configs["text_encoder"]
    found = {k: unet.get(k, v) for k, v in SD1_UNET.items() if unet.get(k, v) != v}
    if not isinstance(unet["attention_head_dim"], int):
        found["attention_head_dim"] = unet["attention_head_dim"]
    if unet["cross_attention_dim"] != text["hidden_size"]:
        found["cross_attention_dim"] = unet["cross_attention_dim"]
    blocks = set(unet["down_block_types"] + unet["up_block_types"])
    if blocks - SD1_BLOCKS:
        found["block types"] = sorted(blocks - SD1_BLOCKS)
    if found:
        details = ", ".join(f"{k}={v}" for k, v in found.items())
        raise WeightsError(f"{folder}: not a Stable Diffusion v1.x checkpoint (unet config: {details}); "
                           f"ldm_min runs v1.x models such as {DEFAULT_REPO}")


def build(configs):
    """Untrained modules of the configured sizes, on the current default device (`meta` to
    allocate nothing before the weights arrive)."""
    text_cfg = CLIPTextConfig(**configs["text_encoder"], attn_implementation="sdpa")
    return {"unet": UNet(configs["unet"]), "vae": VAE(configs["vae"]), "text_encoder": CLIPTextModel(text_cfg)}


def read_state(path, part):
    """The file's tensors under module names: memory-mapped, not yet copied. safetensors maps the
    file once per open and a tensor keeps its mapping alive, so each tensor is read through an open
    of its own: when load_into replaces it by its cast copy, its pages leave memory. A float32 file
    loaded in bfloat16 then peaks at the cast weights plus one tensor, not plus the whole file."""
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
        state = {}
        for name in names:
            new = name
            for old, replacement in RENAMES.get(part, []):
                new = new.replace(old, replacement)
            if new not in IGNORED.get(part, ()):
                with safe_open(path, framework="pt") as f:  # a mapping of its own, see above
                    state[new] = f.get_tensor(name)
        return state
    except Exception as e:  # safetensors reports a damaged file with several exception types
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def load_into(module, state, path, device, dtype):
    """Strict load: every tensor present with its exact shape, nothing left over; cast once."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise WeightsError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise WeightsError(f"{path}: tensor {name} has shape {list(state[name].shape)}, expected "
                               f"{list(tensor.shape)}: is this a Stable Diffusion v1.x checkpoint?")
    for name in list(state):  # cast one tensor at a time: the mapped file is never copied whole
        state[name] = state[name].to(device, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def load_models(weights=None, device="auto", dtype="auto", compile=False):
    """The checkpoint named by `weights` (see the module docstring), ready to sample with;
    `compile`: torch.compile the UNet."""
    device, dtype = pick_device(device, dtype)
    folder = resolve(weights, dtype)
    try:
        configs = read_configs(folder)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{folder}: cannot read the model's config.json files ({e})") from None
    check_family(configs, folder)
    with torch.device("meta"):
        modules = build(configs)
    for part, module in modules.items():
        path = find_weights(folder, part, dtype)
        load_into(module, read_state(path, part), path, device, dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as e:
        raise WeightsError(f"{folder / 'tokenizer'}: cannot load the CLIP tokenizer ({e})") from None
    return assemble(modules, tokenizer, configs, device, dtype, compile)


def assemble(modules, tokenizer, configs, device, dtype, compile=False):
    """Loaded modules as one `Models` bundle, sped up (`ldm_min/fast.py`)."""
    # CLIPTextModel's position_ids is a non-persistent buffer: not in the file, still on `meta`.
    embeddings = modules["text_encoder"].embeddings
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[1], device=device)[None]
    models = Models(**modules, tokenizer=tokenizer, schedule=Schedule(configs["scheduler"]), device=device, dtype=dtype)
    return fast.speed_up(models, compile)


# The captioner of `--prompt auto`: BLIP, the captioner of the paper's Table 1 ("+ BLIP caption").
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
CAPTIONER_FILES = ["*.json", "vocab.txt", "model.safetensors"]  # configs, tokenizer, weights: no pickles


def load_captioner(captioner=None, device="auto", dtype="auto"):
    """(model, processor) of the BLIP captioner `captioner`: a local folder holding its files, or a
    hub repo id (default DEFAULT_CAPTIONER), fetched like the SD weights: only the files it reads."""
    from huggingface_hub import snapshot_download
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device, dtype = pick_device(device, dtype)
    name = str(captioner or DEFAULT_CAPTIONER)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if not is_repo_id(name):
            raise WeightsError(f"--captioner {name}: no such folder")
        try:
            folder = Path(snapshot_download(name, allow_patterns=CAPTIONER_FILES))
        except Exception as e:  # network, authorisation, offline mode
            raise WeightsError(f"could not get the captioner {name} from the hub ({reason(e)}); run again with "
                               f"network access, or pass --captioner FOLDER holding a local copy") from None
    if not (folder / "model.safetensors").is_file():
        raise WeightsError(f"{folder}: no model.safetensors; ldm_min reads safetensors files only (pickle files can "
                           f"run code when opened)")
    try:
        processor = BlipProcessor.from_pretrained(folder)
        model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True, dtype=dtype)
    except Exception as e:
        raise WeightsError(f"{folder}: cannot load a BLIP captioner ({reason(e)})") from None
    return model.to(device).requires_grad_(False).eval(), processor
