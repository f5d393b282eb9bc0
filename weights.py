"""Every step from a `--weights` value to models ready to sample with: find, download, read the
configs, choose device and dtype, build the modules, load them strictly, speed them up.

`--weights` names a local folder in the official layout, a hub repo id (default
CompVis/stable-diffusion-v1-4; the environment variable LDM_MIN_WEIGHTS overrides the default),
or one `.safetensors` file in the original CompVis layout (`sd-v1-4.safetensors` and the v1.x
fine-tunes shared that way), whose names are mapped by the rules of `single_file_names`. Only
safetensors files are read: pickles (.bin, .ckpt) can run code when opened.

`load_adm` loads DDNM's backbone, guided-diffusion's ADM UNet, from its official file: a pickle,
read with torch.load(weights_only=True), which builds tensors and nothing else.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_min import fast
from ldm_min.adm import ADM, GROUPS, HEAD_CHANNELS
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
PICKLES = (".bin", ".ckpt", ".pt", ".pth")
MAPPED_BYTES = 2**26  # 64 MiB: the most of a file that loading keeps mapped beside the loaded weights

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
    """A local folder in the official layout, or a single file, for `weights` (see the docstring)."""
    weights = str(weights or os.environ.get("LDM_MIN_WEIGHTS") or DEFAULT_REPO)
    path = Path(weights).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return path
    if path.suffix in PICKLES:
        raise WeightsError(f"--weights {weights}: a pickle file; ldm_min reads safetensors files only (pickle files "
                           f"can run code when opened). Convert it once where you trust it, e.g. safetensors.torch."
                           f"save_file(torch.load(FILE, weights_only=True)['state_dict'], 'model.safetensors')")
    if path.exists():
        raise WeightsError(f"--weights {weights}: expected a .safetensors file or a folder in the Stable Diffusion "
                           f"layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
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
    pickles = sorted(p.name for p in (folder / part).glob("*") if p.suffix in PICKLES)
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


# Single-file checkpoints keep the original CompVis code's names: each part under a prefix, and
# the UNet's and VAE's blocks numbered and named as that code built them. The rules below map them
# to the modules here (the diffusers names), block by block, from the configs.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}
# The ResNet block's Sequentials: in_layers = norm, SiLU, conv; out_layers = norm, SiLU, dropout, conv.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
CONV_AS_LINEAR = re.compile(r"attn_1\.(q|k|v|proj_out)\.weight")  # 1x1 convolutions there: ours are linears
# What else such files carry, unused here: the EMA copy of the UNet, CLIP's position ids, and the
# training code's DDPM schedule and loss buffers (the schedule here comes from the scheduler config).
TRAINING_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar"]
EXTRAS = re.compile("|".join([r"model_ema\..*", *TRAINING_BUFFERS,
                              r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids"]))


def unet_blocks(cfg):
    """UNet module prefix -> (file prefix, renames inside). The file numbers the blocks in order:
    input_blocks.0 is conv_in, then each level's resnets (with their attentions at .1) and its
    downsampler; middle_block.0-2; output_blocks level by level, the upsampler after the last resnet."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    blocks = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
              "time_embedding.linear_2": ("time_embed.2", {}), "conv_norm_out": ("out.0", {}),
              "conv_out": ("out.2", {}), "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
              "mid_block.attentions.0": ("middle_block.1", {}), "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)}
    for i in range(n):  # a level: `per` input blocks and a downsampler, `per + 1` output blocks
        down_attention = cfg["down_block_types"][i].startswith("CrossAttn")
        up_attention = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(per):
            k = 1 + i * (per + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", UNET_RESNET)
            if down_attention:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
        for j in range(per + 1):
            k = i * (per + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", UNET_RESNET)
            if up_attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
        if i < n - 1:  # every level but the last changes the size: the sampler after its last block
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (per + 1)}.0.op", {})
            k = i * (per + 1) + per  # the level's last output block
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{1 + up_attention}.conv", {})
    return blocks


def vae_blocks(cfg):
    """VAE module prefix -> (file prefix, renames inside). The decoder's levels run in the other
    order in the file: up.0 is the last, widest-resolution one."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    blocks = {}
    for part in ("encoder", "decoder"):
        blocks |= {f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                   f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", VAE_RESNET),
                   f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", VAE_ATTENTION),
                   f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", VAE_RESNET)}
    for i in range(n):
        for j in range(per):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(per + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESNET)
        if i < n - 1:
            blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return blocks


def single_file_names(modules, configs):
    """{name in a single file: (part, module tensor name)} for every tensor of `modules`. A module
    name starts with one of the part's block prefixes (or keeps its name: conv_in, quant_conv...);
    the rest is renamed inside the block. The text encoder keeps its names under its prefix
    (single_file_parts drops the `text_model.` level that some files have)."""
    blocks = {"unet": unet_blocks(configs["unet"]), "vae": vae_blocks(configs["vae"]), "text_encoder": {}}
    names = {}
    for part, module in modules.items():
        for name in module.state_dict():
            prefix = next((b for b in blocks[part] if name.startswith(b + ".")), "")
            file_prefix, renames = blocks[part].get(prefix, (prefix, {}))
            rest = name[len(prefix):].lstrip(".")
            inner = next((r for r in renames if rest.startswith(r + ".")), None)
            if inner:
                rest = renames[inner] + rest[len(inner):]
            names[PREFIXES[part] + ".".join(filter(None, [file_prefix, rest]))] = (part, name)
    return names


def build(configs):
    """Untrained modules of the configured sizes, on the current default device (`meta` to
    allocate nothing before the weights arrive)."""
    text_cfg = CLIPTextConfig(**configs["text_encoder"], attn_implementation="sdpa")
    return {"unet": UNet(configs["unet"]), "vae": VAE(configs["vae"]), "text_encoder": CLIPTextModel(text_cfg)}


def file_shapes(path):
    """name -> shape of every tensor of a safetensors file, read from its header."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}
    except Exception as e:  # safetensors reports a damaged file with several exception types
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def folder_names(path, part):
    """file name -> module name for a part's file in the official layout: the declared renames."""
    names = {}
    for name in file_shapes(path):
        new = name
        for old, replacement in RENAMES.get(part, []):
            new = new.replace(old, replacement)
        if new not in IGNORED.get(part, ()):
            names[name] = new
    return names


def single_file_parts(path, modules, configs):
    """part -> {file name: module name} for a single-file checkpoint: every module tensor found under
    its original name, the EXTRAS skipped, and nothing else in the file."""
    shapes = file_shapes(path)
    check_single_file_family(shapes, configs, path)
    level = PREFIXES["text_encoder"] + "text_model."  # some files have this level, some not
    in_file = {name.replace(level, PREFIXES["text_encoder"], 1): name
               for name in shapes if not EXTRAS.fullmatch(name)}
    names = single_file_names(modules, configs)
    check_names(path, in_file.keys(), names.keys())
    return {part: {in_file[name]: module_name for name, (p, module_name) in names.items() if p == part}
            for part in modules}


def check_single_file_family(shapes, configs, path):
    """One clear line when a single file holds another family: its shapes say what it is."""
    unet, found = configs["unet"], []
    if any(name.startswith(("conditioner.", "model.diffusion_model.label_emb.")) for name in shapes):
        found.append("conditioner.* and label_emb.* tensors (SDXL)")
    contexts = {shape[1] for name, shape in shapes.items() if name.endswith("attn2.to_k.weight")}
    if contexts - {unet["cross_attention_dim"]}:
        found.append(f"a {max(contexts)}-d text context (SD 2.x: 1024)")
    conv_in = shapes.get(PREFIXES["unet"] + "input_blocks.0.0.weight")
    if conv_in and conv_in[1] != unet["in_channels"]:
        found.append(f"a UNet with {conv_in[1]} input channels (an inpainting UNet: 9)")
    if found:
        raise WeightsError(f"{path}: not a Stable Diffusion v1.x checkpoint ({', '.join(found)}); ldm_min runs "
                           f"v1.x models such as {DEFAULT_REPO}")
    if conv_in is None:
        raise WeightsError(f"{path}: no {PREFIXES['unet']}* tensors: not a single-file Stable Diffusion checkpoint")


def read_state(path, names):
    """The file's tensors `names` (file name -> module name) under module names: memory-mapped, not
    yet copied. safetensors maps the file once per open and a tensor keeps its mapping alive, so the
    tensors are read in batches of about MAPPED_BYTES, each through an open of its own: when
    load_into has replaced a batch's tensors by their copies, its pages leave memory. A file then
    peaks at the loaded weights plus one batch, not plus the whole file;
    and the file's header is parsed once a batch, not once a tensor (1 ms for a single file's)."""
    try:
        state, mapped = {}, MAPPED_BYTES
        for name, new in names.items():
            if mapped >= MAPPED_BYTES:
                f, mapped = safe_open(path, framework="pt"), 0  # a mapping of its own, see above
            tensor = f.get_tensor(name)
            mapped += tensor.nbytes
            state[new] = tensor.flatten(1) if CONV_AS_LINEAR.search(name) else tensor
        return state
    except Exception as e:  # safetensors reports a damaged file with several exception types
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def check_names(path, found, expected):
    """Strict: every expected tensor found, nothing left over."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise WeightsError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")


def load_into(module, state, path, device, dtype, family="a Stable Diffusion v1.x checkpoint"):
    """Strict load: every tensor present with its exact shape, nothing left over; cast once."""
    expected = module.state_dict()
    check_names(path, state.keys(), expected.keys())
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise WeightsError(f"{path}: tensor {name} has shape {list(state[name].shape)}, expected "
                               f"{list(tensor.shape)}: is this {family}?")
    for name in list(state):  # one tensor at a time: the mapped file is never copied whole
        # Always a copy, even where the dtype and device already match: a tensor left on the mapping
        # keeps file pages in memory beside any copy a speed-up makes (float32 packed convolutions
        # peaked 2.4 GB higher), and it lies wherever the file put it, where a kernel's rounding can
        # depend on the alignment (a folder and the same weights as one file gave pictures 1 grey
        # level apart on an AVX-512 CPU). Fresh memory is aligned alike whatever the file.
        state[name] = state[name].to(device, dtype, copy=True)
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def checkpoint_configs(path):
    """The configs of the checkpoint at `path`: a folder's own, or v1's for a single file (it has none)."""
    try:
        return read_configs(None if path.is_file() else path)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read the model's config.json files ({e})") from None


def load_models(weights=None, device="auto", dtype="auto", compile=False, tokenizer=None):
    """The checkpoint named by `weights` (see the module docstring), ready to sample with;
    `compile`: torch.compile the UNet; `tokenizer`: see load_tokenizer."""
    device, dtype = pick_device(device, dtype)
    path = resolve(weights, dtype)
    configs = checkpoint_configs(path)
    check_family(configs, path)
    tokenizer = load_tokenizer(tokenizer, path)  # before the weights: a missing one costs no wait
    with torch.device("meta"):
        modules = build(configs)
    if path.is_file():
        files = dict.fromkeys(modules, path)
        names = single_file_parts(path, modules, configs)
    else:
        files = {part: find_weights(path, part, dtype) for part in modules}
        names = {part: folder_names(file, part) for part, file in files.items()}
    for part, module in modules.items():
        load_into(module, read_state(files[part], names[part]), files[part], device, dtype)
    return assemble(modules, tokenizer, configs, device, dtype, compile)


# The CLIP tokenizer of a single file, which has none: v1.4's own, else CLIP ViT-L/14's (the same).
TOKENIZER_REPOS = (DEFAULT_REPO, "openai/clip-vit-large-patch14")
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


def load_tokenizer(tokenizer, checkpoint):
    """The CLIP tokenizer: from `tokenizer` (a folder holding its files, or a hub repo id) when given,
    else the checkpoint folder's tokenizer/, else (a single file) from TOKENIZER_REPOS via the hub."""
    folder = checkpoint / "tokenizer" if tokenizer is None and checkpoint.is_dir() else find_tokenizer(tokenizer)
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:
        raise WeightsError(f"{folder}: cannot load the CLIP tokenizer ({e})") from None


def find_tokenizer(name):
    """A local folder holding the tokenizer's files for `name` (a folder, a hub repo id, or None)."""
    from huggingface_hub import snapshot_download

    inside = lambda folder: folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    if name is not None and Path(name).expanduser().is_dir():
        return inside(Path(name).expanduser())
    if name is not None and not is_repo_id(str(name)):
        raise WeightsError(f"--tokenizer {name}: no such folder")
    for repo in [str(name)] if name else TOKENIZER_REPOS:
        try:
            return inside(Path(snapshot_download(repo, allow_patterns=TOKENIZER_FILES + [
                f"tokenizer/{file}" for file in TOKENIZER_FILES])))
        except Exception as e:  # network, authorisation, offline mode: try the next, then say how
            error = reason(e)
    raise WeightsError(f"could not get the CLIP tokenizer from the hub ({error}), which a single-file checkpoint "
                       f"lacks: run once with network access (it is cached), or pass --tokenizer FOLDER holding its "
                       f"vocab.json and merges.txt (e.g. the tokenizer/ folder of a Stable Diffusion checkpoint)")


def exact_float32(device, dtype):
    """float32 as asked, so a seed gives the CPU's picture: PyTorch lets cuDNN's convolutions round
    their inputs to TF32 by default, a 10-bit mantissa where float32 has 23."""
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False


def assemble(modules, tokenizer, configs, device, dtype, compile=False):
    """Loaded modules as one `Models` bundle, sped up (`ldm_min/fast.py`)."""
    # CLIPTextModel's position_ids is a non-persistent buffer: not in the file, still on `meta`.
    embeddings = modules["text_encoder"].embeddings
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[1], device=device)[None]
    exact_float32(device, dtype)
    models = Models(**modules, tokenizer=tokenizer, schedule=Schedule(configs["scheduler"]), device=device, dtype=dtype)
    return fast.speed_up(models, compile)


# guided-diffusion's ADM UNet, DDNM's backbone (ldm_min/adm.py). Its official files are torch.save
# pickles of the state dict: read with torch.load(weights_only=True), which refuses any object but
# tensors and plain containers, so the file cannot run code. A .safetensors copy of it loads too.
ADM_FAMILY = "a guided-diffusion ADM checkpoint (such as 256x256_diffusion_uncond.pt)"


def adm_state(path):
    """name -> tensor of the ADM checkpoint at `path`: a .safetensors file, or else a pickle read
    with torch.load(weights_only=True) only."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_state(path, {name: name for name in file_shapes(path)})
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused object, a damaged or foreign file: several exception types
        refusal = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(e))  # the object it would not build
        if refusal:
            raise WeightsError(f"{path}: refused: it holds more than tensors ({refusal[1]}), and building that could "
                               f"run code; ldm_min reads pickles with torch.load(weights_only=True) only") from None
        raise WeightsError(f"{path}: not a torch.save file, or a damaged one ({reason(e).split('. ')[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise WeightsError(f"{path}: not a state dict (tensor name -> tensor): is this {ADM_FAMILY}?")
    return state


def adm_config(shapes, path):
    """The ADM's layout (see `ADM`), read from its tensors' shapes (name -> shape). The way up has
    num_res_blocks + 1 numbered steps a level, the last of each level but the top one ending in an
    upsampling ResBlock (output_blocks.K.1 or .2): the first such K is num_res_blocks. Each level's
    width and attention are those of its first step on the way down."""
    def size(name, dim=0):
        if len(shapes.get(name, ())) <= dim:
            raise WeightsError(f"{path}: not {ADM_FAMILY}: no tensor {name} of {dim + 1} dimensions or more")
        return shapes[name][dim]

    if "label_emb.weight" in shapes:
        raise WeightsError(f"{path}: a class-conditional ADM (label_emb.weight); DDNM's backbone is the unconditional "
                           f"one, 256x256_diffusion_uncond.pt")
    steps = {int(m[1]) for m in map(re.compile(r"output_blocks\.(\d+)\.").match, shapes) if m}
    ups = [k for k in sorted(steps) if any(f"output_blocks.{k}.{m}.in_layers.0.weight" in shapes for m in (1, 2))]
    n = ups[0] if ups else len(steps) - 1
    levels = len(steps) // (n + 1) if steps else 0
    first = [1 + level * (n + 1) for level in range(levels)]  # each level's first step on the way down
    cfg = {"in_channels": size("input_blocks.0.0.weight", 1), "out_channels": size("out.2.weight"),
           "model_channels": size("time_embed.0.weight", 1), "num_res_blocks": n,
           "widths": [size(f"input_blocks.{k}.0.out_layers.3.weight") for k in first],
           "attention_levels": [i for i, k in enumerate(first) if f"input_blocks.{k}.1.qkv.weight" in shapes]}
    odd = [w for i, w in enumerate(cfg["widths"]) if w % GROUPS or (i in cfg["attention_levels"] and w % HEAD_CHANNELS)]
    if not cfg["widths"] or odd:
        raise WeightsError(f"{path}: not {ADM_FAMILY}: level widths {cfg['widths']}, each a multiple of {GROUPS} "
                           f"(GroupNorm's groups) and of {HEAD_CHANNELS} where there is attention")
    return cfg


def load_adm(path, device="auto", dtype="auto"):
    """guided-diffusion's ADM UNet from `path` (the official .pt, or a .safetensors copy): its layout
    read from the file's tensors, loaded strictly, on `device` in `dtype` (see `pick_device`)."""
    device, dtype = pick_device(device, dtype)
    path = Path(path).expanduser()
    state = adm_state(path)
    with torch.device("meta"):
        model = ADM(adm_config({name: list(tensor.shape) for name, tensor in state.items()}, path))
    exact_float32(device, dtype)
    return fast.speed_up_adm(load_into(model, state, path, device, dtype, ADM_FAMILY))


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
