"""Must show 2: tokenizer parity with seqio (ids, EOS, truncation) on all DrawBench prompts;
issue 15.5: T5 sentinels `<extra_id_k>` are single ids, as in seqio with extra_ids=100."""

import warnings

import numpy as np
import pytest
import seqio
import tensorflow as tf

from imagen_jax.text import load_t5
from imagen_jax.text.testing import drawbench_prompts, train_sentencepiece, write_random_t5
from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, T5_EXTRA_IDS, Tokenizer, VocabularyError

EXTRA = ["", "   ", "Ünïcödé prompt: 猫が自転車に乗る 🚲", "a " * 200]
# Sentinels: the issue's prompt, several, adjacent, at the ends, mid-word (seqio matches them
# only at a word start), out of range, and near-misses that must stay plain text.
SENTINEL_TEXTS = [
    "<extra_id_0> star",
    "a red <extra_id_1> on a <extra_id_99> table",
    "<extra_id_0><extra_id_1> <extra_id_2>",
    "two cats <extra_id_7>",
    "  <extra_id_5>   star  ",
    "x<extra_id_3>y",
    "<extra_id_100> and <extra_id_-1> and <extra_id_ 4>",
    "<extra_id_0 star <EXTRA_ID_0> extra_id_0>",
    "a photo of <extra_id_12>. A dog",
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spm") / "spiece.model")
    train_sentencepiece(drawbench_prompts(), 512, path)
    return path


def _seqio_reference(spm_path, texts, length, extra_ids=0):
    """seqio's own pipeline: tokenize -> append_eos_after_trim -> trim_and_pad."""
    vocab = seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
    feats = {"inputs": seqio.Feature(vocab, add_eos=True)}
    ds = tf.data.Dataset.from_tensor_slices({"inputs": texts})
    ds = seqio.preprocessors.tokenize(ds, feats)
    ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=feats,
                                                   sequence_length={"inputs": length})
    ds = seqio.utils.trim_and_pad_dataset(ds, {"inputs": length})
    return np.stack([ex["inputs"] for ex in ds.as_numpy_iterator()]), vocab


@pytest.mark.parametrize("length", [128, 12])
def test_matches_seqio(spm_path, length):
    texts = drawbench_prompts() + EXTRA
    assert len(texts) == 204
    ref, vocab = _seqio_reference(spm_path, texts, length)
    tok = Tokenizer(spm_path, max_length=length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = tok(texts)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (204, length)
    np.testing.assert_array_equal(ids, ref)
    # Mask: exactly the non-pad prefix, which always ends in EOS.
    lengths = mask.sum(1)
    np.testing.assert_array_equal(mask, np.arange(length)[None] < lengths[:, None])
    assert np.all(ids[np.arange(len(texts)), lengths - 1] == EOS_ID)
    assert np.all(ids[~mask] == PAD_ID)
    assert lengths[texts.index("")] == 1
    if length == 12:
        assert (lengths == length).sum() > 100  # truncation exercised on most prompts
        assert vocab.decode(ids[0, :-1].tolist()) == vocab.decode(vocab.encode(texts[0])[:11])


@pytest.mark.parametrize("length", [128, 6])
def test_sentinels_match_seqio_with_extra_ids(spm_path, length):
    """With T5's 100 extra ids, sentinel text matches seqio (ids, EOS, truncation); the other
    prompts tokenize as without extra ids."""
    texts = SENTINEL_TEXTS + drawbench_prompts()[:40]
    ref, vocab = _seqio_reference(spm_path, texts, length, extra_ids=T5_EXTRA_IDS)
    tok = Tokenizer(spm_path, max_length=length, extra_ids=T5_EXTRA_IDS)
    assert tok.vocab_size == vocab.vocab_size == tok.num_pieces + 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = tok(texts)
        plain, _ = Tokenizer(spm_path, max_length=length)(texts)
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(mask, ids != PAD_ID)
    no_sentinel = [i for i, t in enumerate(texts) if "extra_id" not in t]
    np.testing.assert_array_equal(ids[no_sentinel], plain[no_sentinel])


def test_issue_prompt_gives_one_sentinel_id(spm_path):
    """`<extra_id_0> star`: one id, the last of the vocabulary (then the word, then EOS), not 15
    character pieces; `<extra_id_99>` is the first id after the sentencepiece pieces."""
    tok = Tokenizer(spm_path, max_length=16, extra_ids=T5_EXTRA_IDS)
    star = tok.processor.encode("star")
    ids, mask = tok(["<extra_id_0> star", "<extra_id_99>"])
    n = len(star) + 2
    assert ids[0, :n].tolist() == [tok.vocab_size - 1, *star, EOS_ID] and mask[0].sum() == n
    assert ids[1, :2].tolist() == [tok.num_pieces, EOS_ID]
    # Without extra ids (the old behaviour) the sentinel is spelled out.
    old, _ = Tokenizer(spm_path, max_length=32)(["<extra_id_0> star"])
    assert (old[0] != PAD_ID).sum() > 10


def test_load_t5_takes_extra_ids_from_the_checkpoint(tmp_path):
    """The number of sentinels is the embedding rows left after the pieces (at most 100), or the
    `extra_ids` argument; too many is a one-line error."""
    texts = ["a red circle", "a blue star", "two green squares"] * 8
    path = write_random_t5(str(tmp_path / "t5"), texts=texts, vocab_size=96)
    enc = load_t5(path, max_length=8)
    pieces = enc.tokenizer.num_pieces
    assert pieces < 96 and enc.tokenizer.extra_ids == 96 - pieces
    ref, _ = _seqio_reference(enc.tokenizer.path, ["<extra_id_0> star"], 8,
                              extra_ids=96 - pieces)
    ids, mask = enc.tokenize(["<extra_id_0> star"])
    np.testing.assert_array_equal(ids, ref)
    assert ids[0, 0] == 95  # the last row of the table
    assert np.isfinite(np.asarray(enc.encode(ids, mask))).all()
    assert load_t5(path, max_length=8, extra_ids=0).tokenizer.extra_ids == 0
    with pytest.raises(VocabularyError, match=f"pass extra_ids <= {96 - pieces}"):
        load_t5(path, extra_ids=T5_EXTRA_IDS)
    with pytest.raises(ValueError, match="extra_ids must be an int >= 0"):
        Tokenizer(enc.tokenizer.path, extra_ids=-1)


def test_truncation_warns_with_dropped_count(spm_path):
    tok = Tokenizer(spm_path, max_length=8)
    text = drawbench_prompts()[150]
    n_pieces = len(tok.processor.encode(text))
    assert n_pieces > 7
    with pytest.warns(UserWarning, match=f"dropped {n_pieces - 7} tokens"):
        ids, mask = tok([text, "car"])
    assert mask[0].all() and ids[0, -1] == EOS_ID
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short prompts do not warn
        tok(["car"])


def test_bad_vocabularies(tmp_path, spm_path):
    with pytest.raises(VocabularyError, match="not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(VocabularyError, match="not a sentencepiece model"):
        Tokenizer(str(junk))
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(spm_path, max_length=0)


def test_non_t5_eos_id_rejected(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(drawbench_prompts()), model_writer=buf,
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "llama_style.model"  # default ids: unk 0, bos 1, eos 2
    path.write_bytes(buf.getvalue())
    with pytest.raises(VocabularyError, match="eos id 2"):
        Tokenizer(str(path))
