"""Must show 1: numerical parity with transformers.T5EncoderModel (PyTorch, CPU)."""

import numpy as np
import pytest

from imagen_jax.text import load_t5
from imagen_jax.text.testing import drawbench_prompts, write_random_t5

# (variant, size): both feed-forward families; "tiny_wide" has num_heads * d_kv != d_model.
CONFIGS = [("v1_0", "tiny"), ("v1_0", "tiny_wide"), ("v1_1", "tiny"), ("v1_1", "tiny_wide")]
MAX_LENGTH = 300  # past the 128 relative-position max distance: exercises the far buckets


def _mixed_prompts() -> list[str]:
    """Prompts from 1 to >300 tokens (the long ones are DrawBench prompts concatenated)."""
    prompts = drawbench_prompts()
    return [
        " ".join(prompts[:60]),  # truncated to MAX_LENGTH
        " ".join(prompts[100:130]),
        prompts[3],
        "",
        "Ein Bär fährt Fahrrad — 熊が自転車に乗る",
    ]


@pytest.fixture(scope="module")
def torch_t5():
    # Plain imports: the test extra installs both, and a broken install must fail, not skip.
    import torch
    import transformers

    torch.set_num_threads(1)
    return torch, transformers.T5EncoderModel


def _transformers_outputs(torch_t5, path: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' ``T5EncoderModel(input_ids, attention_mask).last_hidden_state`` [B, L, D]."""
    torch, T5EncoderModel = torch_t5
    model = T5EncoderModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("variant,size", CONFIGS)
def test_matches_transformers(variant, size, tmp_path, torch_t5, capsys):
    path = write_random_t5(str(tmp_path), texts=drawbench_prompts(), size=size,
                           variant=variant, seed=1)
    with pytest.warns(UserWarning, match="dropped"):
        enc = load_t5(path, max_length=MAX_LENGTH)
        ids, mask = enc.tokenize(_mixed_prompts())
    lengths = mask.sum(1)
    assert lengths.max() == MAX_LENGTH and lengths.min() == 1 and 128 < sorted(lengths)[-2]

    ref = _transformers_outputs(torch_t5, path, ids, mask)

    ours = np.asarray(enc.encode(ids, mask))
    assert ours.dtype == np.float32 and ours.shape == (5, MAX_LENGTH, enc.embed_dim)
    err = np.abs(ours - ref)[mask].max()
    assert err <= 1e-5, f"float32 max abs diff {err:.2e} at unmasked positions"
    assert np.all(ours[~mask] == 0.0), "padded positions are zeroed"

    bf16 = load_t5(path, max_length=MAX_LENGTH, dtype="bfloat16")
    ours_bf16 = np.asarray(bf16.encode(ids, mask))
    err_bf16 = np.abs(ours_bf16 - ref)[mask].max()
    scale = np.abs(ref[mask]).max()
    with capsys.disabled():
        print(f"\n[T5 parity {variant}/{size}] float32 max|diff| {err:.2e}; "
              f"bfloat16 max|diff| {err_bf16:.2e} (max|ref| {scale:.2f})")
    # bf16 has an 8-bit mantissa: a few percent of the activation scale after 2 layers.
    assert ours_bf16.dtype == np.float32 and err_bf16 < 0.1 * scale


IF_LENGTH = 77  # DeepFloyd IF's prompts: 77 tokens, every position fed to the U-Net


@pytest.mark.parametrize("variant", ["v1_1"])
def test_kept_padding_matches_transformers_at_every_position(variant, tmp_path, torch_t5):
    """``zero_padding=False`` (IF's convention) equals transformers' last_hidden_state at ALL
    positions, padded ones included; the fingerprint tells the two modes apart."""
    path = write_random_t5(str(tmp_path), texts=drawbench_prompts(), variant=variant, seed=2)
    enc = load_t5(path, max_length=IF_LENGTH, zero_padding=False)
    ids, mask = enc.tokenize(_mixed_prompts()[1:])  # "" and short prompts: mostly padding
    assert (~mask).sum() > mask.sum()
    ref = _transformers_outputs(torch_t5, path, ids, mask)
    ours = np.asarray(enc.encode(ids, mask))
    err = np.abs(ours - ref).max()
    assert err <= 1e-5, f"float32 max abs diff {err:.2e} over all positions"
    assert np.abs(ours[~mask]).min() > 0, "padded positions keep the encoder's output"
    zeroed = load_t5(path, max_length=IF_LENGTH)
    np.testing.assert_array_equal(np.asarray(zeroed.encode(ids, mask))[mask], ours[mask])
    assert zeroed.fingerprint != enc.fingerprint
    assert enc.fingerprint == zeroed.fingerprint_for(False) and "padkept" in enc.fingerprint
