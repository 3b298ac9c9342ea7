import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.networks.text_encoder import SPECIALS, TextEncoder, build_vocabulary, caption_words

CAPTIONS = ["a music score, key is B-flat major", "a music score, instrumentation is violin", "a music score"]


def test_words_and_vocabulary():
    assert caption_words("Key is F# minor, B-flat!") == ["key", "is", "f#", "minor", "b", "flat"]
    vocab = build_vocabulary(CAPTIONS, 100)
    assert vocab[:3] == list(SPECIALS)
    assert vocab[3:6] == ["a", "music", "score"]  # most frequent first, ties alphabetical
    assert set(vocab[6:]) == {"is", "key", "b", "flat", "major", "instrumentation", "violin"}
    assert build_vocabulary(CAPTIONS, 5) == [*SPECIALS, "a", "music"]


def test_tokenize_cls_padding_unknown_and_truncation():
    enc = TextEncoder(vocab_size=32, max_length=5, width=16, num_layers=1, num_heads=2)
    with pytest.raises(DiffscoreError, match="no vocabulary"):
        enc.tokenize(["a"])
    enc.build_vocabulary(CAPTIONS)
    ids = enc.tokenize(["", "a music cello", "a music score key is major"])
    cls, unk = enc.vocabulary.index("<cls>"), enc.vocabulary.index("<unk>")
    assert ids[0].tolist() == [cls, 0, 0, 0, 0]
    assert ids[1].tolist() == [cls, enc.vocabulary.index("a"), enc.vocabulary.index("music"), unk, 0]
    assert ids[2].shape == (5,) and (ids[2] != 0).all()  # cut at max_length


def test_outputs_ignore_padding_and_vocabulary_reloads():
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=32, max_length=8, width=16, num_layers=2, num_heads=2).eval()
    enc.build_vocabulary(CAPTIONS)
    seq, pooled, mask = enc(["a music score", "a music score key is major"])
    assert seq.shape == (2, 8, 16) and pooled.shape == (2, 16) and mask.sum(1).tolist() == [4, 7]
    alone, pooled_alone, _ = enc(["a music score"])
    torch.testing.assert_close(pooled[:1], pooled_alone)  # padding does not leak into the pooled vector
    torch.testing.assert_close(seq[:1, :4], alone[:, :4])
    fresh = TextEncoder(vocab_size=32, max_length=8, width=16, num_layers=2, num_heads=2).eval()
    fresh.load_state_dict(enc.state_dict())
    assert fresh.vocabulary == enc.vocabulary
    torch.testing.assert_close(fresh(["a music score"])[1], pooled_alone)
    with pytest.raises(DiffscoreError, match="at most"):
        TextEncoder(vocab_size=4, width=16, num_layers=1, num_heads=2).set_vocabulary([*SPECIALS, "a", "b"])
    small = TextEncoder(vocab_size=4, width=16, num_layers=1, num_heads=2)
    small.build_vocabulary(CAPTIONS)  # the table's capacity caps what is kept
    assert small.vocabulary == [*SPECIALS, "a"]
