"""Must show 3 (T5X round trip) plus the checkpoint readers' formats and error messages."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from imagen_jax import partitioning
from imagen_jax.text import (
    CheckpointError,
    UnsupportedT5ConfigError,
    VocabularyError,
    load_t5,
)
from imagen_jax.text.testing import (
    drawbench_prompts,
    hf_to_t5x_tree,
    write_random_t5,
    write_t5x,
)

PROMPTS = ["A red colored car.", "", "a horse riding an astronaut on the moon"]


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def hf_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    return write_random_t5(str(out), texts=drawbench_prompts(), size="tiny_wide",
                           variant=request.param, seed=7)


@pytest.fixture(scope="module")
def hf_v11(tmp_path_factory):
    return write_random_t5(str(tmp_path_factory.mktemp("hf")), texts=drawbench_prompts(),
                           size="tiny_wide", variant="v1_1", seed=8)


def _tree_equal(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_t5x_round_trip(hf_dir, tmp_path):
    variant = json.load(open(os.path.join(hf_dir, "config.json")))["feed_forward_proj"]
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    from_hf = load_t5(hf_dir)
    t5x_dir = write_t5x(str(tmp_path / "checkpoint_1000"),
                        hf_to_t5x_tree(weights, from_hf.config), step=1000)
    assert os.path.isdir(os.path.join(t5x_dir, "target.encoder.layers_0.attention.query.kernel"))

    # T5X directories carry no config: it is inferred from the array shapes.
    from_t5x = load_t5(t5x_dir, vocab=os.path.join(hf_dir, "spiece.model"))
    assert from_t5x.config == from_hf.config, variant
    _tree_equal(from_t5x.params, from_hf.params)
    np.testing.assert_array_equal(np.asarray(from_t5x(PROMPTS)[0]),
                                  np.asarray(from_hf(PROMPTS)[0]))
    assert from_t5x.fingerprint == from_hf.fingerprint  # same weights, same identity

    # Streaming straight into shards works for the tensorstore reader too.
    mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4)
    rules = (("batch", ("data", "fsdp")), ("mlp", "tensor"), ("vocab", "tensor"))
    sharded = load_t5(t5x_dir, vocab=os.path.join(hf_dir, "spiece.model"), mesh=mesh,
                      rules=rules)
    wo = sharded.params["layers_0"]["mlp"]["wo"]
    assert len(wo.addressable_shards) == 8 and wo.addressable_shards[0].data.shape == (12, 32)
    np.testing.assert_allclose(np.asarray(sharded(PROMPTS)[0]), np.asarray(from_hf(PROMPTS)[0]),
                               atol=1e-5)


def test_sharded_safetensors_with_index(hf_v11, tmp_path):
    weights = load_file(os.path.join(hf_v11, "model.safetensors"))
    names = sorted(weights)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in parts.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "spiece.model"):
        (tmp_path / f).write_bytes(open(os.path.join(hf_v11, f), "rb").read())
    _tree_equal(load_t5(str(tmp_path)).params, load_t5(hf_v11).params)


def test_fingerprint_identifies_weights_and_length(tmp_path):
    texts = drawbench_prompts()
    a = write_random_t5(str(tmp_path / "a"), texts=texts, seed=0)
    b = write_random_t5(str(tmp_path / "b"), texts=texts, seed=1)
    enc_a = load_t5(a)
    assert enc_a.embed_dim == 32 and enc_a.max_length == 128
    assert enc_a.fingerprint == load_t5(a).fingerprint
    assert enc_a.fingerprint != load_t5(b).fingerprint
    assert enc_a.fingerprint != load_t5(a, max_length=64).fingerprint


def test_bfloat16_weights_are_stored_in_bfloat16(hf_v11):
    enc = load_t5(hf_v11, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(enc.params)} == {np.dtype(jax.numpy.bfloat16)}
    emb, _ = enc(PROMPTS)
    assert emb.dtype == np.float32 and np.isfinite(np.asarray(emb)).all()


# ----------------------------------------------------------------------------- errors
def _copy(src, dst, skip=()):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f not in skip:
            with open(os.path.join(src, f), "rb") as i, open(os.path.join(dst, f), "wb") as o:
                o.write(i.read())
    return str(dst)


def test_missing_or_unreadable_checkpoint(hf_v11, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_t5(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a Hugging Face"):
        load_t5(str(tmp_path))
    no_weights = _copy(hf_v11, tmp_path / "no_weights", skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_t5(no_weights)
    corrupt = _copy(hf_v11, tmp_path / "corrupt")
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_t5(corrupt)
    (tmp_path / "t5x").mkdir()
    (tmp_path / "t5x" / "checkpoint").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="msgpack"):
        load_t5(str(tmp_path / "t5x"))


def test_unsupported_or_mismatched_config(hf_v11, tmp_path):
    def with_config(name, **changes):
        d = _copy(hf_v11, tmp_path / name)
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg.update(changes)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        return d

    with pytest.raises(UnsupportedT5ConfigError, match="swiglu"):
        load_t5(with_config("act", feed_forward_proj="gated-swiglu"))
    with pytest.raises(UnsupportedT5ConfigError, match="model_type 'bert'"):
        load_t5(with_config("bert", model_type="bert"))
    with pytest.raises(UnsupportedT5ConfigError, match="umt5"):
        load_t5(with_config("umt5", model_type="umt5"))
    with pytest.raises(CheckpointError, match="shape"):
        load_t5(with_config("dff", d_ff=40))
    with pytest.raises(ValueError, match="dtype 'float16'"):
        load_t5(hf_v11, dtype="float16")


def test_vocabulary_larger_than_embedding_table(tmp_path):
    small = write_random_t5(str(tmp_path / "small"), texts=drawbench_prompts(), vocab_size=128)
    big = write_random_t5(str(tmp_path / "big"), texts=drawbench_prompts(), vocab_size=512)
    with pytest.raises(VocabularyError, match="512 pieces .* 128 rows"):
        load_t5(small, vocab=os.path.join(big, "spiece.model"))


def test_bfloat16_safetensors(hf_v11, tmp_path):
    """bf16 checkpoints (common for T5-XXL) load although safetensors' numpy API rejects bf16."""
    import ml_dtypes

    weights = load_file(os.path.join(hf_v11, "model.safetensors"))
    bf16_dir = _copy(hf_v11, tmp_path / "bf16", skip=("model.safetensors",))
    import torch  # the test extra installs it: a broken install fails, never skips
    from safetensors.torch import save_file as save_torch

    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()},
               os.path.join(bf16_dir, "model.safetensors"))
    enc = load_t5(bf16_dir)
    expected = weights["shared.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(enc.params["token_embedder"]), expected)


def test_fp16_variant_files_load(hf_v11, tmp_path):
    """transformers' ``variant="fp16"`` files, sharded (DeepFloyd IF's text_encoder/ layout:
    model.fp16-0000N-of-0000M.safetensors + model.safetensors.index.fp16.json), load as the
    float32 weights rounded to float16."""
    import torch
    import transformers

    model = transformers.T5EncoderModel.from_pretrained(hf_v11).to(torch.float16)
    model.save_pretrained(str(tmp_path), variant="fp16", max_shard_size="20KB",
                          safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.fp16.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    (tmp_path / "spiece.model").write_bytes(open(os.path.join(hf_v11, "spiece.model"), "rb").read())
    got, want = load_t5(str(tmp_path)).params, load_t5(hf_v11).params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float16))
