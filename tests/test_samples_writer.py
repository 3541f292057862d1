"""The one output writer (imagen_jax.eval.samples.write_samples) and its jinja2 templates."""

from __future__ import annotations

import json
import logging
import os

import gin
import numpy as np
import pytest
from PIL import Image

from imagen_jax import gin_utils
from imagen_jax.eval import samples


def _image(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def test_writes_images_pages_and_manifest(tmp_path):
    out = tmp_path / "out"
    prompt = 'un <script>alert("x")</script> & "cercle" très petit'
    written = samples.write_samples(
        str(out), {"images/000_0.png": _image(10), "grid.png": _image(200, 8)},
        manifest={"prompt": prompt, "score": None}, manifest_file="run.json",
        pages={"index.html": samples.Page("demo.html.j2", {
            "title": prompt, "thumb": 8, "preset": "single", "origin": "trained",
            "names": ["base 4px"],
            "summaries": [], "sr_from_truth": [], "truth_resolution": 4, "timings": "{}",
            "rows": [{"prompt": prompt, "cells": [{"src": samples.image_data_uri(_image(10), 8),
                                                   "title": "base 4px"}],
                      "verdicts": [(False, ["colour"])]}]})},
    )
    assert list(written) == ["images/000_0.png", "grid.png", "index.html", "run.json"]
    assert np.asarray(Image.open(out / "images" / "000_0.png")).tolist() == _image(10).tolist()
    assert Image.open(out / "grid.png").size == (8, 8)
    # The manifest keeps prompts readable (no \u escapes) and None as null.
    text = (out / "run.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"prompt": prompt, "score": None} and "\\u" not in text
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page  # autoescaped
    assert page.count("<tr>") == 2 and "&#10007;" in page and "colour" in page
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # temporaries renamed into place


def test_refuses_images_that_are_not_uint8_rgb(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.png: expected a uint8 \[H, W, 3\] image"):
        samples.write_samples(str(tmp_path), {"bad.png": np.zeros((4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match="uint8"):
        samples.image_data_uri(np.zeros((4, 4), np.uint8))
    assert not os.path.exists(tmp_path / "bad.png")


def test_missing_template_variable_fails():
    with pytest.raises(Exception, match="thumb"):
        samples.render_page(samples.Page("drawbench_report.html.j2", {"title": "t"}))


def test_image_data_uri_round_trips():
    import base64
    import io

    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    uri = samples.image_data_uri(image, 4)
    assert uri.startswith(samples.PNG_DATA_URI_PREFIX)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        uri[len(samples.PNG_DATA_URI_PREFIX):]))))
    assert decoded.shape == (4, 4, 3) and (decoded[::2, ::2] == image).all()  # nearest neighbour


def test_gin_includes_log_no_search_path_misses(tmp_path, caplog):
    """Resolving an include of a shipped gin file logs nothing about the search paths that do
    not hold it (gin's resource reader logged six lines per include)."""
    config = tmp_path / "mine.gin"
    config.write_text("include 'mesh/dp.gin'\n")  # found in the shipped gin_configs/
    caplog.set_level(logging.INFO)
    try:
        gin_utils.parse([str(config)], finalize=False)
    finally:
        gin.clear_config()
    noise = [r.getMessage() for r in caplog.records if "resource_reader" in r.pathname]
    assert noise == []
    logging.getLogger().error("Path not found: %s", "kept")  # other records still pass
    assert caplog.records[-1].getMessage() == "Path not found: kept"
