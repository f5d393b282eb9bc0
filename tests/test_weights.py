"""Finding and loading checkpoints: variants, renames, and a clear error for each way it can fail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_min import WeightsError
from weights import hub_patterns, load_models

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "golden" / "tiny-sd"

UNET, VAE, TEXT = "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the tiny checkpoint."""
    return shutil.copytree(TINY, tmp_path / "ckpt")


def rewrite(folder, stem, change, variant=""):
    """Apply `change` to the tensors of folder/stem.safetensors and save them as stem{variant}.safetensors."""
    path = folder / f"{stem}.safetensors"
    tensors = change(load_file(path))
    if variant:
        path.unlink()
    save_file(tensors, folder / f"{stem}{variant}.safetensors")


def new_style(ckpt):
    """Modern files: VAE attention as to_q/to_k/to_v/to_out.0, no position_ids, only .fp16 variants."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

    def vae(tensors):
        out = {}
        for name, t in tensors.items():
            for old, new in renames.items():
                name = name.replace(old, new)
            out[name] = t.half()
        return out

    rewrite(ckpt, VAE, vae, ".fp16")
    rewrite(ckpt, TEXT, lambda ts: {n: t.half() for n, t in ts.items() if "position_ids" not in n}, ".fp16")
    rewrite(ckpt, UNET, lambda ts: {n: t.half() for n, t in ts.items()}, ".fp16")


def test_new_style_fp16_variant_checkpoint_gives_the_same_results(ckpt, tiny_cpu, expected):
    new_style(ckpt)
    models = load_models(ckpt, "cpu", "float32")
    with torch.no_grad():
        pairs = [(models.encode_text("a photo of a cat"), tiny_cpu.encode_text("a photo of a cat")),
                 (models.unet(expected["unet.in.z"], 500, expected["unet.in.context"]), expected["unet.out.eps.t500"]),
                 (models.vae.encode(expected["vae.in.x"]), expected["vae.out.encode_mean_scaled"]),
                 (models.vae.decode(expected["vae.in.z_scaled"]), expected["vae.out.decode"])]
    for found, want in pairs:  # weights rounded to fp16: relative error of order 2^-11 per weight
        assert (found - want).abs().max() <= 1e-2 * want.abs().max()
        assert not torch.equal(found, want)  # it really ran on the rounded weights


def test_plain_file_loads_in_bfloat16(tiny, expected):
    models = load_models(TINY, "cpu", "bfloat16")
    assert models.dtype == torch.bfloat16
    with torch.no_grad():
        eps = models.unet(expected["unet.in.z"].bfloat16(), 500, expected["unet.in.context"].bfloat16())
    assert (eps.float() - expected["unet.out.eps.t500"]).abs().max() <= 0.05 * expected["unet.out.eps.t500"].abs().max()


def test_loaded_weights_are_fresh_aligned_copies_not_the_files_mapping():
    # A tensor left on the mapped file keeps its pages resident beside any copy a speed-up makes,
    # and lies wherever the file put it: oneMKL promises the same results run to run only for
    # 64-byte-aligned data, so a folder and a single file could round differently.
    models = load_models(TINY, "cpu", "float32")  # the file's own dtype: no cast that would copy anyway
    for part in (models.unet, models.vae, models.text_encoder):
        for name, tensor in part.state_dict().items():
            storage = tensor.untyped_storage()
            assert storage.data_ptr() % 64 == 0 and storage.nbytes() == tensor.nbytes, name


def test_float16_prefers_the_fp16_variant_and_float32_the_plain_file(ckpt):
    from weights import find_weights

    rewrite(ckpt / "unet", "diffusion_pytorch_model", lambda ts: {n: t.half() for n, t in ts.items()}, "")
    shutil.copy(ckpt / f"{UNET}.safetensors", ckpt / f"{UNET}.fp16.safetensors")
    assert find_weights(ckpt, "unet", torch.float16).name == "diffusion_pytorch_model.fp16.safetensors"
    assert find_weights(ckpt, "unet", torch.float32).name == "diffusion_pytorch_model.safetensors"


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, UNET, lambda ts: {n: t for n, t in ts.items() if n != "conv_in.bias"})
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: tensor conv_in.bias is missing"):
        load_models(ckpt, "cpu", "float32")


def test_unexpected_tensor_is_named(ckpt):
    rewrite(ckpt, VAE, lambda ts: {**ts, "encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match=r"vae.*unexpected tensor encoder.extra.weight"):
        load_models(ckpt, "cpu", "float32")


def test_wrong_shape_names_tensor_file_and_both_shapes(ckpt):
    rewrite(ckpt, TEXT, lambda ts: {**ts, "final_layer_norm.weight": torch.ones(48)})
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor final_layer_norm.weight has shape \[48\], "
                                           r"expected \[32\]"):
        load_models(ckpt, "cpu", "float32")


def test_other_model_family_is_named_in_one_line(ckpt):
    config = ckpt / "unet" / "config.json"
    config.write_text(config.read_text().replace('"cross_attention_dim": 32', '"cross_attention_dim": 1024, '
                                                 '"use_linear_projection": true'))
    with pytest.raises(WeightsError, match=r"not a Stable Diffusion v1.x checkpoint .*use_linear_projection=True.*"
                                           r"cross_attention_dim=1024") as e:
        load_models(ckpt, "cpu", "float32")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_is_a_clear_error(ckpt, damage):
    path = ckpt / f"{UNET}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: not a valid safetensors file"):
        load_models(ckpt, "cpu", "float32")


def test_pickle_only_folder_is_refused_without_opening_it(ckpt):
    weights = ckpt / f"{UNET}.safetensors"
    weights.unlink()
    bomb = ckpt / "unet" / "diffusion_pytorch_model.bin"
    bomb.write_bytes(b"not even a pickle: opening it would fail loudly")
    with pytest.raises(WeightsError, match=r"found only diffusion_pytorch_model.bin; ldm_min reads safetensors"):
        load_models(ckpt, "cpu", "float32")


def test_missing_weights_file_is_named(ckpt):
    (ckpt / f"{VAE}.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"vae: missing diffusion_pytorch_model.safetensors"):
        load_models(ckpt, "cpu", "float32")


def test_missing_config_is_named(ckpt):
    (ckpt / "unet" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config.json"):
        load_models(ckpt, "cpu", "float32")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"no such folder"):
        load_models(tmp_path / "nowhere", "cpu", "float32")


def test_environment_variable_names_the_default_weights(monkeypatch):
    monkeypatch.setenv("LDM_MIN_WEIGHTS", str(TINY))
    assert load_models(None, "cpu", "float32").unet.conv_in.out_channels == 32


def test_hub_download_asks_only_for_the_files_it_reads():
    import fnmatch

    repo = ["model_index.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
            "sd-v1-4.ckpt", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/config.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
            "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"]
    wanted = {f for f in repo if any(fnmatch.fnmatch(f, p) for p in hub_patterns(".fp16"))}
    assert wanted == {"unet/config.json", "vae/config.json", "text_encoder/config.json",
                      "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                      "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                      "text_encoder/model.fp16.safetensors"}


def offline(tmp_path, *args):
    """Run python with `args` in the repo with no network and an own huggingface cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    env.pop("LDM_MIN_WEIGHTS", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_hub_repo_without_network_or_cache_says_how_to_get_weights(tmp_path):
    image, mask = TINY.parent / "astronaut128.png", TINY.parent / "astronaut128_mask.png"
    r = offline(tmp_path, str(ROOT / "inpaint.py"), str(image), str(mask))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    for needed in ("CompVis/stable-diffusion-v1-4", "licence", "HF_TOKEN", "--weights PATH"):
        assert needed in r.stderr
    assert not (tmp_path / "astronaut128_inpainted.png").exists()


def test_hub_repo_loads_offline_from_the_cache(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(TINY, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    r = offline(tmp_path, "-c", "from weights import load_models; print(load_models('someone/tiny-sd', 'cpu', "
                                "'float32').unet.conv_in.out_channels)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "32"
