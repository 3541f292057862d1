"""Guidance sweep and the fid/sweep launcher subcommands (stand-in sampler)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_jax.eval import fid, sweep
from tests.support_eval import build_reference_inception, stand_in_factory, torch_features

STAND_IN = "tests.support_eval:stand_in_factory"


def _color_features(images):
    x = images.astype(np.float64) / 255
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def _brightness(images, prompts):
    return images.reshape(len(images), -1).mean(1) / 255 * 100


def test_pareto_front():
    xs = [1.0, 2.0, 3.0, 2.5, 0.5]
    ys = [5.0, 4.0, 6.0, 3.0, 1.0]
    # (2,4) is dominated by (2.5,3); (1,5) by (2.5,3).
    assert sweep.pareto_front(xs, ys) == [4, 3, 2]


def test_sweep_metrics_resume_and_plot(tmp_path):
    prompts = [f"prompt {i}" for i in range(5)]
    ref_images = np.concatenate([stand_in_factory(1.0)(prompts, s) for s in range(100, 106)])
    reference = fid.FeatureStats.from_features(_color_features(ref_images), extractor="color")
    kw = dict(
        num_samples=30,
        chunk_size=10,
        feature_fn=_color_features,
        feature_dim=6,
        reference=reference,
        extractor_id="color",
        scorers={"clip_score": _brightness},
    )
    points = sweep.run_guidance_sweep(
        stand_in_factory, [1.0, 4.0, 9.0], prompts, str(tmp_path), **kw
    )
    fids = [p["fid"] for p in points]
    scores = [p["clip_score"] for p in points]
    assert fids[0] < fids[1] < fids[2]  # darker with more guidance: further from the reference
    assert scores[0] > scores[1] > scores[2]
    for w, p in zip([1.0, 4.0, 9.0], points):
        store = fid.SampleStore.open(str(tmp_path / f"guidance_{w:g}"))
        images = np.concatenate([im for im, _ in store.iter_chunks()])
        assert len(images) == 30
        assert p["clip_score"] == pytest.approx(_brightness(images, None).mean())
        stats = fid.FeatureStats.from_features(_color_features(images))
        assert p["fid"] == pytest.approx(
            fid.frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
        )

    def must_not_sample(w):
        raise AssertionError("finished points must come from sweep.json")

    again = sweep.run_guidance_sweep(must_not_sample, [1.0, 4.0, 9.0], prompts, str(tmp_path), **kw)
    assert again == points
    png = sweep.plot_sweep(points, str(tmp_path / "pareto.png"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
        assert np.asarray(im.convert("L")).std() > 5  # something was drawn


def _run(*args):
    from launch import evaluate

    try:
        evaluate.main(evaluate.parse_flags(["evaluate", *args]))
    finally:
        evaluate.FLAGS.unparse_flags()


def test_launcher_sweep_defaults_to_shapes_adherence(tmp_path, capsys):
    _run(
        "sweep",
        f"--sample_fn={STAND_IN}",
        "--guidance=1,3",
        "--num_samples=4",
        "--batch_size=2",
        f"--out={tmp_path}",
    )
    with open(tmp_path / "sweep.json") as f:
        points = json.load(f)["points"]
    assert [p["guidance"] for p in points] == [1.0, 3.0]
    # Stand-in images are not shapes scenes: adherence is measured and is 0.
    assert all(p["shapes_adherence"] == 0.0 for p in points)
    assert os.path.getsize(tmp_path / "sweep.png") > 1000


def test_launcher_fid_end_to_end_matches_torch_features(tmp_path):
    model, sd = build_reference_inception()
    weights = str(tmp_path / "inception.pth")
    torch.save(sd, weights)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(ref_images):
        Image.fromarray(im).save(ref_dir / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = [
        "fid",
        f"--sample_fn={STAND_IN}",
        f"--inception_weights={weights}",
        f"--reference={ref_dir}",
        "--reference_resolution=32",
        "--num_samples=6",
        "--batch_size=4",
        f"--prompts={prompts}",
        "--metric_batch_size=8",
        f"--out={tmp_path / 'o'}",
    ]
    _run(*args)
    with open(tmp_path / "o" / "fid.json") as f:
        result = json.load(f)

    store = fid.SampleStore.open(str(tmp_path / "o" / "samples"))
    samples = np.concatenate([store.read_chunk(i)[0] for i in range(store.num_chunks())])
    assert samples.shape == (6, 32, 32, 3)
    a = torch_features(model, samples).astype(np.float64)
    b = torch_features(model, ref_images).astype(np.float64)
    # Independent closed form for n < dim: with S = Xc^T Xc / (n - 1), tr((S_a S_b)^(1/2)) is the
    # nuclear norm of Xa Xb^T / sqrt((na - 1)(nb - 1)) (no 2048 x 2048 decomposition needed).
    xa, xb = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    tr_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / scale
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.sum(xa**2) / (len(a) - 1)
        + np.sum(xb**2) / (len(b) - 1)
        - 2 * tr_covmean
    )
    assert result["fid"] == pytest.approx(expected, rel=1e-4)
    assert result["fid"] > 1.0
    assert os.listdir(tmp_path / "o" / "stats")  # reference statistics cached
