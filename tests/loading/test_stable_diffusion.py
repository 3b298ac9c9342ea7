"""diffscore.loading.stable_diffusion: a tiny diffusers folder (tests/sd_files.py) is read into the right parts,
without network access and without running or importing anything the folder names; broken or unsafe folders give
one DiffscoreError line naming the file."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
import torch

from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond, schedule_sigmas
from diffscore.errors import DiffscoreError
from diffscore.loading.stable_diffusion import read_stable_diffusion, stable_diffusion_denoiser
from tests.sd_files import LATENT_SIZE, SCALING_FACTOR, SCHEDULER, edit_json, tiny_pipeline, write_sd_folder

SEED = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=SEED)


@pytest.fixture
def copy(folder, tmp_path):
    """A fresh copy of the folder to break."""
    return shutil.copytree(folder, tmp_path / "copy")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reads_the_parts_the_pipeline_saved(folder):
    parts = read_stable_diffusion(folder)
    original = tiny_pipeline(seed=SEED)  # the same random weights
    assert same_weights(parts.backbone.unet, original.unet)
    assert same_weights(parts.vae, original.vae)
    assert same_weights(parts.backbone.text_encoder, original.text_encoder)
    assert sorted(p.name for p in (folder / "tokenizer").iterdir())[0] == "merges.txt"  # SD's tokenizer files
    caption = "a music score for piano, key is B minor"
    assert parts.backbone.tokenizer(caption).input_ids == original.tokenizer(caption).input_ids
    assert parts.schedule == {
        k: SCHEDULER[k] for k in ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end")
    }
    assert parts.prediction_type == "epsilon"
    assert parts.scaling_factor == SCALING_FACTOR
    assert parts.latent_shape == parts.backbone.data_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert parts.folder == folder
    assert parts.backbone.text_encoder is not None and parts.backbone.label_dim == 0


def test_reads_a_tokenizer_saved_as_tokenizer_json(tmp_path):
    """The module fixture's tokenizer/ is SD's vocab.json + merges.txt; transformers 5 saves tokenizer.json."""
    folder = write_sd_folder(tmp_path / "json-tokenizer", seed=SEED, tokenizer_files="json")
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    caption = "a music score for violin, key is A major"
    ids = read_stable_diffusion(folder).backbone.tokenizer(caption).input_ids
    assert ids == tiny_pipeline(seed=SEED).tokenizer(caption).input_ids


def test_a_missing_library_is_one_error_line(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(DiffscoreError, match=r"needs diffusers and transformers .* pip install 'diffscore\[sd\]'"):
        read_stable_diffusion(folder)


def test_the_denoiser_uses_the_folder_schedule(folder):
    parts = read_stable_diffusion(folder)
    denoiser = stable_diffusion_denoiser(parts)
    assert isinstance(denoiser, DiscreteDDPMPrecond) and denoiser.backbone is parts.backbone
    levels = schedule_sigmas("scaled_linear", 1000, 0.00085, 0.012)
    assert (denoiser.sigma_min, denoiser.sigma_max) == (float(levels[0]), float(levels[-1]))
    assert denoiser.prediction_type == "epsilon" and not denoiser.quantize
    assert stable_diffusion_denoiser(parts, quantize=True).quantize


def test_reading_never_touches_the_network(folder, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a local read")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    read_stable_diffusion(folder)
    assert attempts == []


def test_pickled_weights_are_refused_unless_trusted(tmp_path):
    pickled = write_sd_folder(tmp_path / "bin", seed=SEED, safe=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(
        DiffscoreError,
        match=r"unet/diffusion_pytorch_model\.bin: pickled weights .* --trust_checkpoint true \(trust=True\)",
    ):
        read_stable_diffusion(pickled)
    parts = read_stable_diffusion(pickled, trust=True)
    assert same_weights(parts.backbone.unet, tiny_pipeline(seed=SEED).unet)


def test_variant_weights_must_exist(folder):
    with pytest.raises(DiffscoreError, match="no 'fp16' weights"):
        read_stable_diffusion(folder, variant="fp16")


def test_code_the_folder_names_or_holds_never_runs(copy, tmp_path):
    """A module in the folder that would leave a marker file when imported: named as a pipeline, a component
    class or through ``auto_map`` (transformers' remote code), it is refused or ignored, never imported."""
    marker = tmp_path / "imported"
    for name in ("evil.py", "text_encoder/evil.py", "tokenizer/evil.py"):
        (copy / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    edit_json(copy / "text_encoder" / "config.json", auto_map={"AutoModel": "evil.Evil"})
    edit_json(copy / "tokenizer" / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Evil", None]})
    read_stable_diffusion(copy)  # auto_map is ignored: diffscore names the classes
    index = json.loads((copy / "model_index.json").read_text())
    for key, value in [("_class_name", ["evil", "Evil"]), ("unet", ["evil", "Evil"]), ("extra", ["evil", "Evil"])]:
        broken = dict(index, **{key: value})
        (copy / "model_index.json").write_text(json.dumps(broken))
        with pytest.raises(DiffscoreError, match="model_index.json"):
            read_stable_diffusion(copy)
    assert not marker.exists()


@pytest.mark.parametrize(
    "path, changes, message",
    [
        ("model_index.json", {"vae": ...}, r"model_index.json: no vae component"),
        ("model_index.json", {"vae": ["diffusers", "AutoencoderTiny"]}, r"vae = \['diffusers', 'AutoencoderTiny'\]"),
        ("model_index.json", {"unet": "UNet2DConditionModel"}, r"unet = \['UNet2DConditionModel'\]; diffscore reads"),
        ("vae/config.json", {"latent_channels": 8}, r"unet/config.json: in_channels 4 .* latent_channels 8"),
        ("unet/config.json", {"class_embed_type": "timestep"}, r"unet/config.json: \['class_embed_type'\]"),
        ("unet/config.json", {"cross_attention_dim": 64}, r"cross_attention_dim 64 .* hidden_size 32"),
        ("unet/config.json", {"_class_name": "UNet2DModel"}, r"unet/config.json: a UNet2DModel"),
        ("scheduler/scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "not a discrete DDPM"),
        ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type 'sample'"),
        ("scheduler/scheduler_config.json", {"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ("scheduler/scheduler_config.json", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("scheduler/scheduler_config.json", {"beta_start": 0.5, "beta_end": 0.1}, "0 < beta_start < beta_end"),
        ("tokenizer/tokenizer_config.json", {"model_max_length": 77}, "tokenizer: model_max_length 77 exceeds"),
    ],
)
def test_broken_folders_raise_one_line_naming_the_file(copy, path, changes, message):
    edit_json(copy / path, **changes)
    with pytest.raises(DiffscoreError, match=message) as info:
        read_stable_diffusion(copy)
    assert "\n" not in str(info.value)


def test_missing_files_and_non_diffusers_folders(copy, tmp_path):
    with pytest.raises(DiffscoreError, match="no model_index.json, so not a diffusers model folder"):
        read_stable_diffusion(tmp_path / "copy" / "unet")
    with pytest.raises(DiffscoreError, match="not a folder"):
        read_stable_diffusion(tmp_path / "nowhere")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DiffscoreError, match=r"unet: no weights \(\*\.safetensors\)"):
        read_stable_diffusion(copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(DiffscoreError, match=r"vae/config.json: missing"):
        read_stable_diffusion(copy)
    (copy / "model_index.json").write_text("{not json")
    with pytest.raises(DiffscoreError, match="model_index.json: not valid JSON"):
        read_stable_diffusion(copy)


def test_a_corrupt_weights_file_is_one_error_line(copy):
    (copy / "text_encoder" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(DiffscoreError, match=r"text_encoder: could not be loaded") as info:
        read_stable_diffusion(copy)
    assert "\n" not in str(info.value)


def test_omitted_schedule_keys_mean_diffusers_defaults(copy):
    edit_json(copy / "scheduler" / "scheduler_config.json", beta_schedule=..., beta_start=..., beta_end=...)
    parts = read_stable_diffusion(copy)
    assert parts.schedule == {
        "beta_schedule": "linear",
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
    }
