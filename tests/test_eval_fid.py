"""FID math against pytorch-fid, streamed statistics, reference caches and the sample store."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance

from imagen_jax.eval import fid


def _random_stats(rng, dim, n):
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + rng.standard_normal(
        dim
    )
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim,n", [(16, 200), (64, 500), (128, 1000)])
def test_frechet_distance_matches_pytorch_fid(dim, n):
    rng = np.random.default_rng(dim + n)
    mu1, s1 = _random_stats(rng, dim, n)
    mu2, s2 = _random_stats(rng, dim, n)
    expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert expected > 1.0  # a non-trivial distance
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_frechet_distance_singular_covariances():
    """Fewer samples than dimensions: S = X^T X / (n - 1) is singular.

    Independent exact route: the eigenvalues of S1 S2 = X^T X Y^T Y / (n-1)^2 are the squared
    singular values of X Y^T / (n - 1), so tr((S1 S2)^(1/2)) is the nuclear norm of that.
    pytorch-fid's sqrtm of a singular product is only accurate to ~1e-8 relative there.
    """
    rng = np.random.default_rng(5)
    n, dim = 40, 64
    x = rng.standard_normal((n, dim))
    y = rng.standard_normal((n, dim)) * 1.3 + 0.2
    xc, yc = x - x.mean(0), y - y.mean(0)
    s1, s2 = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1)
    mu1, mu2 = x.mean(0), y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T / (n - 1), compute_uv=False).sum()
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, exact, rtol=1e-11)
    np.testing.assert_allclose(got, calculate_frechet_distance(mu1, s1, mu2, s2), rtol=1e-7)


def test_frechet_distance_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 32))
    a = fid.FeatureStats.from_features(feats)
    b = fid.FeatureStats.from_features(feats.copy())
    assert fid.fid_from_stats(a, b) == pytest.approx(0.0, abs=1e-9)
    c = fid.FeatureStats.from_features(feats + 0.5)  # mean shift of 0.5 in 32 dims
    assert fid.fid_from_stats(a, c) == pytest.approx(32 * 0.25, rel=1e-9)


def test_streamed_stats_equal_numpy():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((1000, 24)) * 1e-2 + 1e3).astype(np.float32)  # large offset
    stats = fid.FeatureStats.empty(24)
    for chunk in np.array_split(feats, [7, 300, 301, 900]):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        stats.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-15
    )


def test_stats_save_load_roundtrip(tmp_path):
    stats = fid.FeatureStats.from_features(
        np.random.default_rng(2).standard_normal((50, 8)), extractor="x"
    )
    path = str(tmp_path / "s.npz")
    stats.save(path)
    back = fid.FeatureStats.load(path)
    assert back.n == 50 and back.meta == {"extractor": "x"}
    np.testing.assert_allclose(back.sigma, stats.sigma)
    other = fid.FeatureStats.from_features(np.ones((3, 8)) + np.eye(3, 8), extractor="y")
    with pytest.raises(ValueError, match="different feature extractors"):
        fid.fid_from_stats(stats, other)


def _color_features(images: np.ndarray) -> np.ndarray:
    """Cheap deterministic stand-in feature: per-channel means and stds (6-d)."""
    x = images.astype(np.float64) / 255
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def _stand_in_sample_fn(prompts, seed):
    rng = np.random.default_rng([seed, len(prompts)])
    return rng.integers(0, 256, (len(prompts), 16, 16, 3), dtype=np.uint8)


def test_sample_store_resumes_after_preemption(tmp_path):
    prompts = [f"prompt {i}" for i in range(7)]
    full = fid.SampleStore(str(tmp_path / "full"), chunk_size=4, seed=3)
    full.fill(_stand_in_sample_fn, prompts, 22)
    assert full.num_samples() == 22 and full.num_chunks() == 6

    calls = []

    def preempted(p, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt("preempted")
        calls.append(seed)
        return _stand_in_sample_fn(p, seed)

    store = fid.SampleStore(str(tmp_path / "resumed"), chunk_size=4, seed=3)
    with pytest.raises(KeyboardInterrupt, match="preempted"):
        store.fill(preempted, prompts, 22)
    assert store.num_chunks() == 3
    store = fid.SampleStore(str(tmp_path / "resumed"), chunk_size=4, seed=3)
    store.fill(_stand_in_sample_fn, prompts, 22)
    for (a, pa), (b, pb) in zip(full.iter_chunks(), store.iter_chunks(), strict=True):
        np.testing.assert_array_equal(a, b)
        assert pa == pb
    fd = fid.fid_from_stats(full.stats(_color_features, 6), store.stats(_color_features, 6))
    assert fd == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="was started with"):
        fid.SampleStore(str(tmp_path / "resumed"), chunk_size=8, seed=3)


def test_reference_stats_from_directory_are_cached(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(4)
    for i in range(5):
        size = (30 + 5 * i, 40)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    seen = []

    def feature_fn(images):
        seen.append(images.shape)
        return _color_features(images)

    kw = dict(
        extractor_id="color:1",
        cache_dir=str(tmp_path / "cache"),
        resolution=16,
        batch_size=2,
        dim=6,
    )
    stats = fid.reference_stats(str(ref), feature_fn, **kw)
    assert stats.n == 5 and seen == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    again = fid.reference_stats(str(ref), feature_fn, **kw)
    assert len(seen) == 3  # served from the cache
    np.testing.assert_allclose(again.sigma, stats.sigma)
    with pytest.raises(ValueError, match="neither a directory"):
        fid.reference_stats(str(tmp_path / "nope"), feature_fn, **kw)
