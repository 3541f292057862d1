"""Must show 4 and 5: sharded encoder == single-device encoder; XXL parameter count by shape."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagen_jax import partitioning
from imagen_jax.text import load_t5, t5_preset
from imagen_jax.text.checkpoints import abstract_params
from imagen_jax.text.testing import drawbench_prompts, write_random_t5

# Megatron-style tensor parallelism over a 4-way axis, batch over a 2-way data axis.
TENSOR_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_t5(str(tmp_path_factory.mktemp("t5")), texts=drawbench_prompts(),
                           size="tiny", variant="v1_1", seed=3)


def test_sharded_matches_single_device(ckpt):
    assert jax.device_count() == 8
    mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4)
    sharded = load_t5(ckpt, mesh=mesh, rules=TENSOR_RULES)
    single = load_t5(ckpt)

    query = sharded.params["layers_0"]["attention"]["query"]  # [D, H, K]
    assert query.sharding.spec == P(None, "tensor", None)
    assert query.addressable_shards[0].data.shape == (32, 1, 8)  # 4 heads / 4-way tensor axis
    wo = sharded.params["layers_1"]["mlp"]["wo"]  # [F, D]
    assert wo.addressable_shards[0].data.shape == (64 // 4, 32)
    assert sharded.params["token_embedder"].sharding.spec == P("tensor", None)

    prompts = drawbench_prompts()[10:13]  # batch 3: padded to the 2-way data axis internally
    emb_sharded, mask = sharded(prompts)
    emb_single, mask_single = single(prompts)
    np.testing.assert_array_equal(mask, mask_single)
    assert emb_sharded.shape == (3, 128, 32)
    np.testing.assert_allclose(np.asarray(emb_sharded), np.asarray(emb_single), atol=1e-5)
    assert sharded.fingerprint == single.fingerprint

    # The trainer calls encode inside its own jitted step (on-the-fly text encoding).
    ids, mask = sharded.tokenize(prompts)
    in_jit = jax.jit(lambda i, m: sharded.encode(i, m) + single.encode(i, m))(ids, mask)
    np.testing.assert_allclose(np.asarray(in_jit), 2 * np.asarray(emb_single), atol=2e-5)


def test_xxl_parameter_count_without_allocation():
    cfg = t5_preset("xxl", "v1_1")
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.vocab_size) == (
        4096, 64, 64, 10240, 24, 32128)
    abstract = abstract_params(cfg)  # jax.eval_shape: ShapeDtypeStructs only
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert 4.7e9 <= n <= 4.8e9, n
    # Every parameter carries logical axis names for sharding.
    specs = jax.tree.leaves(partitioning.logical_specs(abstract),
                            is_leaf=lambda x: isinstance(x, P))
    assert len(specs) == len(leaves) and all(len(s) > 0 for s in specs)
    names = {a for s in specs for a in s}
    assert names == {"vocab", "embed", "heads", "kv", "mlp", "relpos_buckets"}
