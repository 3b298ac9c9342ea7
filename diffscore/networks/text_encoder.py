"""A small learned text encoder for caption-conditioned backbones (the MusicScore issue's default encoder).

Word-level tokenizer: lower-cased runs of letters, digits and '#'; the vocabulary is the most frequent words of
the training captions (``build_vocabulary``), kept in the module's state (``get_extra_state``), so a checkpoint
reloads with the vocabulary it was trained with. Every sequence starts with a ``<cls>`` token; the empty caption
"" is ``<cls>`` alone and serves as the null condition of classifier-free guidance (Ho & Salimans 2022).
Returns the token sequence (for cross-attention), the pooled vector (the ``<cls>`` output, for the noise
embedding) and the key mask. (The paper itself uses a frozen OpenCLIP ViT-H-14; FACTS.md.)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from diffscore.errors import DiffscoreError

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
SPECIALS = (PAD, UNK, CLS)


def caption_words(text: str) -> list[str]:
    """The words of a caption: lower-cased runs of [a-z0-9#] ("B-flat major" -> ["b", "flat", "major"])."""
    return re.findall(r"[a-z0-9#]+", text.lower())


def build_vocabulary(captions: Iterable[str], size: int) -> list[str]:
    """Specials then the ``size - 3`` most frequent words (ties broken alphabetically): deterministic."""
    counts = Counter(w for c in captions for w in caption_words(c))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, size - len(SPECIALS))]
    return [*SPECIALS, *words]


class TextEncoder(nn.Module):
    """Token embedding + learned positions -> pre-norm transformer encoder -> (seq [B, L, W], pooled [B, W])."""

    def __init__(
        self,
        vocab_size: int = 512,  # capacity of the embedding table (specials included)
        max_length: int = 32,  # tokens per caption, <cls> included; longer captions are cut
        width: int = 128,  # token width W
        num_layers: int = 2,  # transformer layers
        num_heads: int = 4,  # attention heads
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"text width {width} does not split into {num_heads} heads")
        if vocab_size <= len(SPECIALS) or max_length < 2:
            raise ValueError(f"need vocab_size > {len(SPECIALS)} and max_length >= 2")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.width = width
        self.token = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, num_heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.vocabulary: list[str] = []
        self._index: dict[str, int] = {}

    # the vocabulary travels in state_dict (plain strings: loadable with weights_only=True)
    def get_extra_state(self) -> dict:
        return {"vocabulary": list(self.vocabulary)}

    def set_extra_state(self, state: dict) -> None:
        self.set_vocabulary(list(state.get("vocabulary", [])))

    def set_vocabulary(self, vocabulary: Sequence[str]) -> None:
        if vocabulary and (list(vocabulary[: len(SPECIALS)]) != list(SPECIALS) or len(vocabulary) > self.vocab_size):
            raise DiffscoreError(
                f"a text vocabulary must start with {SPECIALS} and hold at most {self.vocab_size} entries"
            )
        self.vocabulary = list(vocabulary)
        self._index = {w: i for i, w in enumerate(self.vocabulary)}

    def build_vocabulary(self, captions: Iterable[str]) -> None:
        """Fill the vocabulary from training captions (the most frequent words that fit the table)."""
        self.set_vocabulary(build_vocabulary(captions, self.vocab_size))

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [B, max_length] (0 = padding), on the module's device."""
        if not self.vocabulary:
            raise DiffscoreError(
                "the text encoder has no vocabulary: train with a caption DataModule (e.g. MusicScoreDataModule, "
                "which builds it from the training captions) or call build_vocabulary(captions)"
            )
        unk, cls = self._index[UNK], self._index[CLS]
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [cls] + [self._index.get(w, unk) for w in caption_words(text)]
            row = row[: self.max_length]
            ids[i, : len(row)] = torch.tensor(row)
        return ids.to(self.token.weight.device)

    def forward(self, tokens: Tensor | Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(seq [B, L, W], pooled [B, W], mask [B, L] with True at real tokens) of token ids or captions."""
        if not isinstance(tokens, Tensor):
            tokens = self.tokenize(list(tokens))
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens must be [B, L<={self.max_length}], got {tuple(tokens.shape)}")
        mask = tokens != 0  # [B, L]
        mask[:, 0] = True  # <cls> is always there
        h = self.token(tokens) + self.position[: tokens.shape[1]]  # [B, L, W]
        h = self.layers(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        return h, h[:, 0], mask


def find_text_encoder(module: nn.Module | None) -> TextEncoder | None:
    """The TextEncoder of a backbone (or of a module holding one), None if it has none."""
    if module is None:
        return None
    for m in module.modules():
        if isinstance(m, TextEncoder):
            return m
    return None
