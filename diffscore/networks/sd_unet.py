"""Stable Diffusion's U-Net and CLIP text encoder as a diffscore backbone F(x_in, c_noise, cond, aug_label).

Wraps a diffusers ``UNet2DConditionModel`` (epsilon or v prediction on VAE latents) and a transformers
``CLIPTextModel`` + CLIP tokenizer (Rombach et al. 2022, Sec. 3.3: cross-attention on the text encoder's token
sequence). The backbone never sees sigma: c_noise is the (fractional) DDPM timestep that
diffscore.core.discrete_ddpm.DiscreteDDPMPrecond computes, x_in the latent already divided by sqrt(sigma^2 + 1).

Captions are encoded as diffusers' StableDiffusionPipeline.encode_prompt does: the tokenizer pads to its
``model_max_length`` (77 for CLIP) and truncates longer captions (here with a warning, once per backbone); the
token ids go through the text encoder without an attention mask (unless its config asks for one); the conditioning
is the last hidden state after the final layer norm (``clip_skip`` k: the hidden state k layers earlier, then the
final layer norm). SD 2's OpenCLIP ViT-H/14 is stored with its last layer removed, so its "last" hidden state is
OpenCLIP's penultimate one. The empty caption "" is the null condition of classifier-free guidance (cond None).
This module imports neither diffusers nor transformers: the loader (diffscore.loading.stable_diffusion) builds
the parts and hands them in.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffscore.networks.backbone import Backbone

NULL_CAPTION = ""


class StableDiffusionUNet(Backbone):
    """F(x_in [B, C, h, w], c_noise [B] (DDPM timesteps), cond (B captions, precomputed embeddings [B, L, D], or
    None = the null caption)) -> the U-Net's prediction [B, C, h, w]. The text encoder is frozen (no gradients,
    run under no_grad); both networks are ordinary submodules (``unet.*``, ``text_encoder.*`` in the state dict)."""

    null_caption = NULL_CAPTION  # the unconditional caption of classifier-free guidance

    def __init__(
        self,
        unet: nn.Module,  # diffusers UNet2DConditionModel
        text_encoder: nn.Module,  # transformers CLIPTextModel (frozen here)
        tokenizer: Any,  # transformers CLIPTokenizer matching the text encoder
        clip_skip: int | None = None,  # condition on the hidden state this many layers before the last
    ) -> None:
        super().__init__()
        ucfg, tcfg = unet.config, text_encoder.config
        if ucfg.cross_attention_dim != tcfg.hidden_size:
            raise ValueError(
                f"the U-Net attends to {ucfg.cross_attention_dim}-d text tokens but the text encoder gives "
                f"{tcfg.hidden_size}-d ones"
            )
        if clip_skip is not None and not 0 <= clip_skip < tcfg.num_hidden_layers:
            raise ValueError(f"clip_skip must be in 0 .. {tcfg.num_hidden_layers - 1}, got {clip_skip}")
        size = ucfg.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.data_shape = (int(ucfg.in_channels), int(height), int(width))  # latent [C, h, w]
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self._warned_truncation = False

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Token ids [B, model_max_length] as the pipeline makes them (max-length padding, truncation); warns once
        when a caption is longer than the tokenizer takes."""
        tok = self.tokenizer
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be strings, got {captions!r:.80}")
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        if not self._warned_truncation:
            lengths = [len(row) for row in tok(captions, padding=False, truncation=False, verbose=False).input_ids]
            if max(lengths, default=0) > tok.model_max_length:
                warnings.warn(
                    f"a caption of {max(lengths)} tokens was truncated to the text encoder's {tok.model_max_length} "
                    "(the rest of it is ignored, as in diffusers' StableDiffusionPipeline)",
                    stacklevel=3,
                )
                self._warned_truncation = True
        return torch.tensor(ids, dtype=torch.long)  # [B, L]

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> Tensor:
        """The text conditioning [B, L, D] of captions, in the text encoder's dtype, on its device."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenize(captions).to(device)  # [B, L]
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()  # [B, L]
        if self.clip_skip is None:
            return self.text_encoder(ids, attention_mask=mask)[0]  # last_hidden_state [B, L, D]
        hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(hidden[-(self.clip_skip + 1)])

    def text_condition(self, cond: Tensor | Sequence[str] | None, batch: int) -> Tensor:
        """Embeddings [B, L, D] for ``cond``: B captions, None (the null caption for every row), or embeddings
        [B, L, D] (or [1, L, D], shared by the batch) passed through."""
        if cond is None:
            cond = [self.null_caption] * batch
        if isinstance(cond, Tensor):
            if cond.ndim != 3 or cond.shape[0] not in (1, batch) or not cond.is_floating_point():
                raise ValueError(f"text embeddings must be float [B={batch} or 1, L, D], got {tuple(cond.shape)}")
            return cond.expand(batch, -1, -1)
        if isinstance(cond, str) or len(cond) != batch:
            raise ValueError(f"cond must be a list of {batch} captions, got {cond!r:.80}")
        return self.encode(cond)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | Sequence[str] | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        if aug_label is not None:
            raise ValueError("StableDiffusionUNet takes no augmentation label (augment_dim 0)")
        dtype = self.unet.dtype
        text = self.text_condition(cond, x.shape[0]).to(device=x.device, dtype=dtype)  # [B, L, D]
        timesteps = c_noise.reshape(-1).expand(x.shape[0])  # [B]
        return self.unet(x.to(dtype), timesteps, encoder_hidden_states=text, return_dict=False)[0]  # [B, C, h, w]
