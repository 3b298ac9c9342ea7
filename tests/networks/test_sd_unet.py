"""diffscore.networks.sd_unet: the Stable Diffusion backbone encodes captions exactly as diffusers'
StableDiffusionPipeline does and calls the U-Net on them; tiny random parts from tests/sd_files.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffscore.networks.backbone import config
from diffscore.networks.sd_unet import StableDiffusionUNet
from tests.sd_files import LATENT_SIZE, MAX_TOKENS, one_thread, tiny_pipeline, tiny_unet

CAPTIONS = ["a music score for violin, key is A major", "piano"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=3)


@pytest.fixture
def backbone(pipe):
    return StableDiffusionUNet(pipe.unet, pipe.text_encoder, pipe.tokenizer)


def test_captions_are_encoded_as_the_pipeline_encodes_them(pipe, backbone):
    """Bit for bit the prompt and the empty negative prompt of encode_prompt (max-length padding, no mask, last
    hidden state after the final layer norm)."""
    prompt_embeds, negative_embeds = pipe.encode_prompt(CAPTIONS, "cpu", 1, True, None)
    assert torch.equal(backbone.encode(CAPTIONS), prompt_embeds)
    assert torch.equal(backbone.encode(["", ""]), negative_embeds)
    assert backbone.encode(CAPTIONS).shape == (2, MAX_TOKENS, 32)


def test_long_captions_are_truncated_with_one_warning(pipe, backbone):
    long = [" ".join(["music"] * 40)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = backbone.encode(long)
        again = backbone.encode(long)
    assert [str(w.message) for w in caught if "truncated" in str(w.message)] == [
        f"a caption of 42 tokens was truncated to the text encoder's {MAX_TOKENS} (the rest of it is ignored, as "
        "in diffusers' StableDiffusionPipeline)"
    ]
    assert torch.equal(first, again)
    reference, _ = pipe.encode_prompt(long, "cpu", 1, False, None)  # the pipeline truncates the same way
    assert torch.equal(first, reference)


def test_clip_skip_conditions_on_an_earlier_layer_after_the_final_norm(pipe):
    """clip_skip k: hidden state k layers before the last, through the final layer norm (what encode_prompt's
    clip_skip computes; its own code path needs ``text_encoder.text_model``, absent from transformers 5's
    CLIPTextModel, so the reference is written out here)."""
    skip = StableDiffusionUNet(pipe.unet, pipe.text_encoder, pipe.tokenizer, clip_skip=1)
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(hidden[-2])
    assert torch.equal(skip.encode(CAPTIONS), expected)
    assert not torch.equal(expected, StableDiffusionUNet(pipe.unet, pipe.text_encoder, pipe.tokenizer).encode(CAPTIONS))


def test_forward_is_the_unet_on_the_encoded_captions(pipe, backbone):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=gen)
    t = torch.tensor([17.25, 903.5])
    with torch.no_grad():
        expected = pipe.unet(x, t, encoder_hidden_states=backbone.encode(CAPTIONS)).sample
        null = pipe.unet(x, t, encoder_hidden_states=backbone.encode(["", ""])).sample
        assert torch.equal(backbone(x, t, CAPTIONS), expected)
        assert torch.equal(backbone(x, t, None), null)  # None is the null caption ""
        assert torch.equal(backbone(x, t, backbone.encode(CAPTIONS)), expected)  # precomputed embeddings
        shared = backbone(x, t, backbone.encode(CAPTIONS[:1]))  # [1, L, D] serves the whole batch
        torch.testing.assert_close(shared, backbone(x, t, [CAPTIONS[0]] * 2))  # batch 1 vs 2: round-off
    assert not torch.equal(expected, null)


def test_declares_a_text_conditioned_latent_backbone(pipe, backbone):
    assert backbone.data_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert (backbone.label_dim, backbone.augment_dim, backbone.null_caption) == (0, 0, "")
    assert backbone.text_encoder is pipe.text_encoder
    keys = backbone.state_dict().keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert backbone.init_kwargs["unet"] is pipe.unet  # handed-in modules are kept, not cloned
    assert config(backbone) is None  # not rebuildable from plain data


def test_gradients_reach_the_unet_and_not_the_frozen_text_encoder(backbone):
    x = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE)
    backbone(x, torch.tensor([500.0]), CAPTIONS[:1]).square().mean().backward()
    assert all(p.grad is not None for p in backbone.unet.parameters() if p.requires_grad)
    assert all(not p.requires_grad and p.grad is None for p in backbone.text_encoder.parameters())
    backbone.unet.zero_grad(set_to_none=True)


def test_bad_inputs_raise(pipe, backbone):
    x, t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="augmentation"):
        backbone(x, t, CAPTIONS, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="list of 2 captions"):
        backbone(x, t, CAPTIONS[:1])
    with pytest.raises(ValueError, match="list of 2 captions"):
        backbone(x, t, "one string")
    with pytest.raises(TypeError, match="captions must be strings"):
        backbone.encode([1, 2])
    with pytest.raises(ValueError, match="text embeddings"):
        backbone(x, t, torch.zeros(3, MAX_TOKENS, 32))
    with pytest.raises(ValueError, match="64-d text tokens"):
        StableDiffusionUNet(tiny_unet(cross_attention_dim=64), pipe.text_encoder, pipe.tokenizer)
    with pytest.raises(ValueError, match="clip_skip"):
        StableDiffusionUNet(pipe.unet, pipe.text_encoder, pipe.tokenizer, clip_skip=2)
