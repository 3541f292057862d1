"""Parity of the Flax FID Inception with pytorch-fid's InceptionV3 (same random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagen_jax.eval import inception
from imagen_jax.eval.weights import load_state_dict
from tests.support_eval import build_reference_inception, torch_features


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model, published_sd = build_reference_inception()
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
    torch.save(published_sd, path)
    return model, path


@pytest.fixture(scope="module")
def extractor(reference):
    _, path = reference
    return inception.make_inception_extractor(weights_path=path, batch_size=8)


@pytest.mark.parametrize("size", [(299, 299), (64, 80), (331, 400)])
def test_pool3_matches_pytorch_fid(reference, extractor, size):
    model, _ = reference
    rng = np.random.default_rng(sum(size))
    images = rng.integers(0, 256, (3, *size, 3), dtype=np.uint8)
    expected = torch_features(model, images)
    got = extractor(images)
    assert got.shape == (3, 2048)
    # Guard against a vacuous pass: the features must be O(1) and differ between images.
    assert 0.05 < np.abs(expected).mean() < 100
    assert np.abs(expected[0] - expected[1]).max() > 1e-2
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_float_input_equals_uint8(extractor):
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    as_float = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(extractor(as_float), extractor(images), atol=1e-5)


def test_resize_matrix_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    for in_size, out_size in [(64, 299), (500, 299), (299, 299), (7, 3), (1, 5)]:
        x = rng.standard_normal((1, 1, in_size, 1)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(out_size, 1), mode="bilinear", align_corners=False
        )[0, 0, :, 0].numpy()
        got = inception.bilinear_resize_matrix(in_size, out_size) @ x[0, 0, :, 0]
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_weight_formats_agree(reference, tmp_path):
    model, path = reference
    sd = load_state_dict(path)
    # The legacy (pre-zip) torch stream and the wrapper's own blocks.i.j names load identically.
    legacy = str(tmp_path / "legacy.pth")
    torch.save(
        {k: torch.from_numpy(v) for k, v in sd.items()},
        legacy,
        _use_new_zipfile_serialization=False,
    )
    wrapper = str(tmp_path / "wrapper.pth")
    torch.save(model.state_dict(), wrapper)
    ref = inception.variables_from_state_dict(sd)
    for other in (legacy, wrapper):
        got = inception.load_inception_variables(other)
        for a, b in zip(
            __import__("jax").tree_util.tree_leaves(ref),
            __import__("jax").tree_util.tree_leaves(got),
        ):
            np.testing.assert_array_equal(a, b)


def test_wrong_weights_named_in_error(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="do not match the FID InceptionV3"):
        inception.load_inception_variables(path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        inception.load_inception_variables(str(tmp_path / "missing.pth"))


def test_float_out_of_range_rejected(extractor):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor(np.full((1, 8, 8, 3), 200.0, np.float32))
