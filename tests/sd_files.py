"""Tiny Stable Diffusion folders written by the tests: the real diffusers / transformers classes with random weights,
saved by diffusers' own ``StableDiffusionPipeline.save_pretrained`` (the layout a fine-tuning script writes), no
download. A U-Net of two blocks (32 and 64 channels) on 4 x 8 x 8 latents, a two-block VAE (16 x 16 images), a
two-layer CLIP text encoder and a CLIP BPE tokenizer over a vocabulary written here.
"""

from __future__ import annotations

import contextlib
import json
import string
from collections.abc import Iterator
from pathlib import Path

import torch

MAX_TOKENS = 16  # the tokenizer's model_max_length (CLIP's is 77)
LATENT_SIZE = 8  # latents are 4 x 8 x 8
VAE_SCALE = 2  # the tiny VAE halves the resolution once: 16 x 16 images
SCALING_FACTOR = 0.3  # not SD's 0.18215, so a test sees it is read from the file
WORDS = ["a", "music", "score", "for", "violin", "piano", "key", "is", "major", "minor", "the"]
SCHEDULER = {  # SD 1.x / 2-base's scheduler/scheduler_config.json (a PNDMScheduler)
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block: these networks are so small that handing each op to a second
    thread costs more than it saves (a U-Net call 17 ms on one thread, ~200 ms on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer():
    """A CLIP BPE tokenizer: the start/end tokens, every lower-case letter, digit and some punctuation (with and
    without the end-of-word mark ``</w>``), and merges that spell WORDS."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.#-!":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: "m u" -> "mu", "mu s" -> "mus", ..., "musi c</w>" -> "music</w>"
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(cross_attention_dim: int = 32, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=LATENT_SIZE * VAE_SCALE,
        scaling_factor=SCALING_FACTOR,
    ).eval()


def tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0, vae_latent_channels: int = 4):
    """A StableDiffusionPipeline of the tiny parts, random weights drawn from ``seed`` (the global RNG is left as
    it was), with SD's PNDM scheduler config."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer))
        unet = tiny_unet()
        vae = tiny_vae(vae_latent_channels)
    scheduler = PNDMScheduler(**SCHEDULER, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_sd_folder(
    dest: Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    safe: bool = True,
    vae_latent_channels: int = 4,
    tokenizer_files: str = "vocab",
) -> Path:
    """Save a tiny pipeline to ``dest`` as diffusers does (``safe=False``: pickled ``.bin`` weights).

    ``tokenizer_files``: "vocab" writes tokenizer/ as SD 1.x / 2.x releases ship it (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json); "json": as transformers 5 saves it (tokenizer.json).
    """
    pipe = tiny_pipeline(prediction_type, seed, vae_latent_channels)
    pipe.save_pretrained(dest, safe_serialization=safe)
    if tokenizer_files == "vocab":
        write_vocab_tokenizer(dest / "tokenizer", pipe.tokenizer)
    return dest


def write_vocab_tokenizer(directory: Path, tokenizer) -> None:
    """Replace ``directory`` by the classic CLIP tokenizer files of ``tokenizer``."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    for old in directory.iterdir():
        old.unlink()
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    specials["pad_token"] = "<|endoftext|>"
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def edit_json(path: Path, **changes) -> None:
    """Set (or, with value ``...``, delete) keys of a JSON file in place."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
