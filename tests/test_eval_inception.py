"""Parity of the Flax FID Inception with pytorch-fid's InceptionV3 (same random weights)."""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
import torch

from imagen_jax.eval import inception
from imagen_jax.eval.weights import load_state_dict


@functools.lru_cache(maxsize=1)
def build_reference_inception(seed: int = 0):
    """pytorch-fid's FID InceptionV3 with random weights, built without any download.

    Returns (wrapper, published-format state dict). ``fid_inception_v3`` fetches the TF-ported
    weights; we patch the fetch and the load so the network keeps random weights, and capture
    the inner torchvision module to get the published file's (torchvision) key names.
    Cached: the eval test modules share one network (building it is a few CPU seconds).
    """
    import torchvision
    from pytorch_fid import inception as pfi

    captured = []

    def fake_load(self, state_dict, *args, **kwargs):
        captured.append(self)

    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict", fake_load),
    ):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    model.eval()
    # torch's default init shrinks activations layer after layer, which would make the parity
    # check trivially pass on near-zero features: use He-scaled kernels and non-trivial BN stats.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in captured[0].modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_((2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.7 + 0.6 * torch.rand(n, generator=gen))
    return model, captured[0].state_dict()


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


def _torch_features(model, images_uint8: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid input
    with torch.no_grad():
        return model(x)[0][:, :, 0, 0].numpy()


@pytest.mark.parametrize("size", [(299, 299), (64, 80), (331, 400)])
def test_pool3_matches_pytorch_fid(reference, extractor, size):
    model, _ = reference
    rng = np.random.default_rng(sum(size))
    images = rng.integers(0, 256, (3, *size, 3), dtype=np.uint8)
    expected = _torch_features(model, images)
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
