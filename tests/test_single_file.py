"""Single-file checkpoints in the original CompVis layout (sd-v1-4.safetensors and the v1.x
fine-tunes shared that way): the names the rules give, and the tiny checkpoint written as one file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import inpaint
import weights
from ldm_min import WeightsError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TINY = GOLDEN / "tiny-sd"
TEXT = weights.PREFIXES["text_encoder"]


def single_file(path, text_model_level=True, change=None):
    """The tiny checkpoint as one file: each tensor under its original name (the inverse of the
    rules), the VAE's attention projections as the 1x1 convolutions they are there, and the extra
    tensors such files carry. `change(tensors)` edits the tensors before they are written."""
    configs = weights.read_configs(TINY)
    with torch.device("meta"):
        modules = weights.build(configs)
    original = {module_name: name for name, module_name in weights.single_file_names(modules, configs).items()}
    tensors = {}
    for part in modules:
        file = weights.find_weights(TINY, part, torch.float32)
        for name, tensor in weights.read_state(file, weights.folder_names(file, part)).items():
            key = original[part, name]
            if part == "text_encoder" and text_model_level:
                key = key.replace(TEXT, TEXT + "text_model.")
            tensors[key] = tensor[..., None, None] if weights.CONV_AS_LINEAR.search(key) else tensor
    first = weights.PREFIXES["unet"] + "input_blocks.0.0.weight"
    tensors |= {"model_ema.diffusion_modelinput_blocks00weight": tensors[first].clone(),
                "model_ema.decay": torch.ones(()), "betas": torch.linspace(0.00085, 0.012, 1000),
                "alphas_cumprod": torch.rand(1000), "logvar": torch.zeros(1000),
                TEXT + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file(change(tensors) if change else tensors, path)
    return path


@pytest.fixture
def tiny_configs(tmp_path, monkeypatch):
    """The tiny model's configs stand in for the bundled v1.4 ones that a single file is built from."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for part, config in weights.read_configs(TINY).items():
        (folder / f"{part}.json").write_text(json.dumps(config))
    monkeypatch.setattr(weights, "SD14_CONFIGS", folder)


@pytest.fixture
def model_file(tmp_path, tiny_configs):
    return single_file(tmp_path / "tiny.safetensors")


def load(path, dtype="float32"):
    return weights.load_models(path, "cpu", dtype, tokenizer=TINY / "tokenizer")


@pytest.mark.parametrize("text_model_level", [True, False])
def test_a_single_file_loads_the_folders_weights_bit_for_bit(tmp_path, tiny_configs, tiny_cpu, text_model_level):
    models = load(single_file(tmp_path / "tiny.safetensors", text_model_level))
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(models, part).state_dict(), getattr(tiny_cpu, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours), part


def test_the_golden_run_is_the_same_picture_from_the_single_file(model_file, tiny_cpu, expected, golden_picture):
    # Bit for bit: the same values, each copied into fresh 64-byte-aligned memory whatever its offset
    # in the file (test_weights.py), so the same kernels run on the same data in this process.
    picture = lambda models: np.asarray(golden_picture(models, "run_b"))
    result = picture(load(model_file))
    assert np.array_equal(result, picture(tiny_cpu))
    assert np.abs(result.astype(np.int16) - expected["run_b.image_uint8"].numpy()).max() <= 1


def test_the_cli_takes_a_single_file_and_a_tokenizer_folder(model_file, tmp_path, capsys):
    image, mask = GOLDEN / "astronaut128.png", GOLDEN / "astronaut128_mask.png"
    common = [str(image), str(mask), "--steps", "2", "--quiet"]
    inpaint.main(common + ["--weights", str(model_file), "--tokenizer", str(TINY), "-o", str(tmp_path / "file.png")])
    inpaint.main(common + ["--weights", str(TINY), "-o", str(tmp_path / "folder.png")])
    assert (tmp_path / "file.png").read_bytes() == (tmp_path / "folder.png").read_bytes()


def test_a_float16_file_loads_in_float32(tmp_path, tiny_configs, tiny_cpu):
    path = single_file(tmp_path / "half.safetensors", change=lambda ts: {n: t.half() if t.is_floating_point() else t
                                                                          for n, t in ts.items()})
    weight = load(path).unet.state_dict()["conv_in.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, tiny_cpu.unet.state_dict()["conv_in.weight"].half().float())


def full_size_names():
    """The rules applied to the full-size v1.4 modules (whose tensors are the official files' own:
    test_architecture.py)."""
    configs = weights.read_configs()
    with torch.device("meta"):
        modules = weights.build(configs)
    every = {(part, name) for part, module in modules.items() for name in module.state_dict()}
    return weights.single_file_names(modules, configs), every


def test_every_full_size_tensor_has_exactly_one_original_name():
    names, every = full_size_names()
    assert len(every) == 1130 and sorted(names.values()) == sorted(every)  # none lost, none doubled
    assert all(name.startswith(weights.PREFIXES[part]) for name, (part, _) in names.items())


# Names of sd-v1-4.safetensors as the original code (ldm/modules/diffusionmodules/openaimodel.py and
# model.py) builds them, and the module tensors they are.
ORIGINAL = {
    "model.diffusion_model.input_blocks.0.0.weight": ("unet", "conv_in.weight"),
    "model.diffusion_model.time_embed.2.bias": ("unet", "time_embedding.linear_2.bias"),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": ("unet", "down_blocks.0.resnets.0.norm1.weight"),
    "model.diffusion_model.input_blocks.2.1.proj_in.weight": ("unet", "down_blocks.0.attentions.1.proj_in.weight"),
    "model.diffusion_model.input_blocks.3.0.op.weight": ("unet", "down_blocks.0.downsamplers.0.conv.weight"),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight":
        ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    "model.diffusion_model.input_blocks.9.0.op.bias": ("unet", "down_blocks.2.downsamplers.0.conv.bias"),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": ("unet", "down_blocks.3.resnets.1.conv2.weight"),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": ("unet", "mid_block.resnets.1.time_emb_proj.weight"),
    "model.diffusion_model.output_blocks.2.1.conv.weight": ("unet", "up_blocks.0.upsamplers.0.conv.weight"),
    "model.diffusion_model.output_blocks.5.2.conv.weight": ("unet", "up_blocks.1.upsamplers.0.conv.weight"),
    "model.diffusion_model.output_blocks.8.2.conv.bias": ("unet", "up_blocks.2.upsamplers.0.conv.bias"),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight":
        ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"),
    "model.diffusion_model.out.0.weight": ("unet", "conv_norm_out.weight"),
    "model.diffusion_model.out.2.bias": ("unet", "conv_out.bias"),
    "first_stage_model.encoder.down.0.block.1.conv2.weight": ("vae", "encoder.down_blocks.0.resnets.1.conv2.weight"),
    "first_stage_model.encoder.down.2.downsample.conv.weight":
        ("vae", "encoder.down_blocks.2.downsamplers.0.conv.weight"),
    "first_stage_model.encoder.mid.attn_1.q.weight": ("vae", "encoder.mid_block.attentions.0.to_q.weight"),
    "first_stage_model.encoder.mid.attn_1.norm.bias": ("vae", "encoder.mid_block.attentions.0.group_norm.bias"),
    "first_stage_model.decoder.mid.attn_1.proj_out.bias": ("vae", "decoder.mid_block.attentions.0.to_out.0.bias"),
    "first_stage_model.decoder.mid.block_2.norm1.weight": ("vae", "decoder.mid_block.resnets.1.norm1.weight"),
    "first_stage_model.decoder.up.3.block.2.conv1.weight": ("vae", "decoder.up_blocks.0.resnets.2.conv1.weight"),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
        ("vae", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"),
    "first_stage_model.decoder.up.1.upsample.conv.weight": ("vae", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
    "first_stage_model.decoder.norm_out.weight": ("vae", "decoder.conv_norm_out.weight"),
    "first_stage_model.post_quant_conv.weight": ("vae", "post_quant_conv.weight"),
    "cond_stage_model.transformer.encoder.layers.11.mlp.fc2.bias": ("text_encoder", "encoder.layers.11.mlp.fc2.bias"),
}


def test_the_rules_give_the_original_codes_names():
    names, _ = full_size_names()
    assert {name: names.get(name) for name in ORIGINAL} == ORIGINAL


def test_the_extras_such_files_carry_are_known_and_nothing_else():
    extra = ["model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelout2weight", "betas",
             "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef2", "logvar",
             "cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert all(weights.EXTRAS.fullmatch(name) for name in extra)
    assert not any(weights.EXTRAS.fullmatch(name) for name in ["model.diffusion_model.betas", "betas.weight",
                                                                 "first_stage_model.logvar", "ema.decay"])


@pytest.mark.parametrize("change, message", [
    (lambda ts: ts | {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
     "(SDXL)"),
    (lambda ts: {n: t.new_zeros(t.shape[0], 64) if n.endswith("attn2.to_k.weight") else t for n, t in ts.items()},
     "a 64-d text context (SD 2.x: 1024)"),
    (lambda ts: ts | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
     "a UNet with 9 input channels (an inpainting UNet: 9)"),
    (lambda ts: ts | {"model.diffusion_model.input_blocks.1.0.extra.weight": torch.zeros(1)},
     "unexpected tensor model.diffusion_model.input_blocks.1.0.extra.weight (1 unexpected in all)"),
    (lambda ts: {n: t for n, t in ts.items() if n != "first_stage_model.decoder.up.0.block.1.conv1.weight"},
     "tensor first_stage_model.decoder.up.0.block.1.conv1.weight is missing (1 missing in all)"),
    (lambda ts: {n: t for n, t in ts.items() if not n.startswith("model.diffusion_model.")},
     "no model.diffusion_model.* tensors"),
])
def test_a_file_of_another_kind_is_one_line_naming_what_was_found(tmp_path, tiny_configs, change, message):
    path = single_file(tmp_path / "other.safetensors", change=change)
    with pytest.raises(WeightsError) as e:
        load(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_pickle_checkpoint_is_refused_without_opening_it(tmp_path, capsys):
    ckpt = tmp_path / "sd-v1-4.ckpt"
    ckpt.write_bytes(b"not even a pickle")
    with pytest.raises(SystemExit) as e:
        inpaint.run([str(GOLDEN / "astronaut128.png"), str(GOLDEN / "astronaut128_mask.png"), "--weights", str(ckpt),
                     "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "pickle" in err and "safetensors.torch.save_file" in err and not (tmp_path / "out.png").exists()


def test_without_a_tokenizer_offline_the_cli_says_how_to_give_one(tmp_path, tiny_configs):
    path = single_file(tmp_path / "tiny.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("LDM_MIN_WEIGHTS", None)
    r = subprocess.run([sys.executable, str(ROOT / "inpaint.py"), str(GOLDEN / "astronaut128.png"),
                        str(GOLDEN / "astronaut128_mask.png"), "--weights", str(path)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "tokenizer" in r.stderr and "--tokenizer FOLDER" in r.stderr
    assert not (tmp_path / "astronaut128_inpainted.png").exists()


def test_a_tokenizer_given_by_name_that_is_neither_folder_nor_repo_is_named(model_file):
    with pytest.raises(WeightsError, match=r"--tokenizer \./nowhere: no such folder"):
        weights.load_models(model_file, "cpu", "float32", tokenizer="./nowhere")
