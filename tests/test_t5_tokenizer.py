"""Must show 2: tokenizer parity with seqio (ids, EOS, truncation) on all DrawBench prompts."""

import warnings

import numpy as np
import pytest

from imagen_jax.text.testing import drawbench_prompts, train_sentencepiece
from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, Tokenizer, VocabularyError

EXTRA = ["", "   ", "Ünïcödé prompt: 猫が自転車に乗る 🚲", "a " * 200]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spm") / "spiece.model")
    train_sentencepiece(drawbench_prompts(), 512, path)
    return path


def _seqio_reference(spm_path, texts, length):
    """seqio's own pipeline: tokenize -> append_eos_after_trim -> trim_and_pad."""
    seqio = pytest.importorskip("seqio")
    import tensorflow as tf

    vocab = seqio.SentencePieceVocabulary(spm_path)
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
