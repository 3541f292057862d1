"""A miniature `make demo`: the whole pipeline (dataset -> random T5 -> embedding cache -> three
stages through the real trainer -> compiled cascade -> scores -> grid/HTML/json) with a handful
of steps, then the second run that must reuse the checkpoints and only sample."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from imagen_jax.errors import CascadeError
from launch import demo
from tests.support_eval import chromium_probe

# The text of each result row's cells, as Chromium rendered them.
ROWS_JS = """function probeExtra() {
  return Array.from(document.querySelectorAll('table tr')).slice(1).map(
    r => Array.from(r.cells).map(c => c.textContent.trim()));
}"""

# Smaller U-Nets than the demo's: this test checks the plumbing, compile time dominates.
TINY = [
    "BaseUNet.channels = 16",
    "BaseUNet.channel_mult = [1, 2]",
    "BaseUNet.attn_resolutions = [8]",
    "EfficientUNet.blocks = [[8, 1], [16, 1]]",
    "EfficientUNet.stem_channels = 8",
    "TrainConfig.batch_size = 8",
    "TrainConfig.log_every = 1",
    "TrainConfig.progress_bar = False",
    "SamplingConfig.num_steps = 2",
]


def test_miniature_demo_trains_samples_scores_and_reuses_checkpoints(tmp_path):
    out = tmp_path / "demo"
    first = demo.run(str(out), num_prompts=4, num_train=32, num_train_512=8, steps=(2, 2, 2),
                     bindings=TINY, progress=False)
    for name in ("grid.png", "index.html", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [s["num_images"] for s in results["scores"]] == [4, 4, 4]
    # The SR stages are also scored alone, on the ground-truth base-resolution images.
    assert [s["num_images"] for s in results["sr_from_ground_truth"]] == [4, 4]
    assert len(results["prompts"]) == 4
    html = (out / "index.html").read_text()
    assert html.count("<tr>") == 5 and results["prompts"][0].split()[0] in html
    assert "ground-truth 32px" in html
    assert [x.shape for x in first["result"].images] == [(4, 32, 32, 3), (4, 128, 128, 3),
                                                         (4, 512, 512, 3)]
    # The page in headless Chromium: every stage's image of every prompt decodes, and each row
    # shows the prompt and each stage's verdict (the attributes it got wrong) from the scorer.
    shown = chromium_probe(str(out / "index.html"), tmp_path, ROWS_JS)
    assert shown["total"] == shown["loaded"] == 4 * 3
    for i, cells in enumerate(shown["extra"]):
        assert cells[0] == results["prompts"][i]
        verdicts = cells[4:]
        assert len(verdicts) == 3
        for stage, verdict in enumerate(verdicts):
            assert verdict.startswith("\u2713" if results["exact"][stage][i] else "\u2717")
    assert any(len(v) > 2 for cells in shown["extra"] for v in cells[4:])  # wrong attributes named
    assert all(first["timings"][f"train_{n}_s"] > 0 for n in demo.STAGES)
    for n in demo.STAGES:
        assert os.path.isdir(out / "stages" / n / "checkpoints")

    second = demo.run(str(out), num_prompts=4, num_train=32, num_train_512=8, steps=(2, 2, 2),
                      bindings=TINY, progress=False)
    assert all(second["timings"][f"train_{n}_s"] == 0 for n in demo.STAGES)
    # Same checkpoints, prompts and seed: the same images.
    for a, b in zip(first["result"].images, second["result"].images):
        assert (a == b).all()
    for a, b in zip(first["sr_from_ground_truth"], second["sr_from_ground_truth"]):
        assert a["exact_match"] == b["exact_match"] and a["colour"] == b["colour"]

    # Exported as a pretrained demo cascade (float16 EMA parameters + the random T5) and sampled
    # by a later run before it trains: the same images, up to the parameters' float16 rounding.
    dest = tmp_path / "pretrained"
    assert demo.export_cascade(str(out), str(dest), command="make demo") > 0
    provenance = json.loads((dest / "PROVENANCE.json").read_text())
    assert provenance["steps"] == {n: 2 for n in demo.STAGES}
    assert provenance["results"]["prompts"] == results["prompts"]
    # With a spent budget (--budget_s=0) each unfinished stage still trains one step (here from
    # its step-2 checkpoint towards 4) and saves it; the report names the steps reached.
    third = demo.run(str(out), num_prompts=4, num_train=32, num_train_512=8, steps=(4, 4, 4),
                     bindings=TINY, progress=False, pretrained=str(dest), budget_s=0)
    assert json.loads((out / "results.json").read_text())["steps"] == [3, 3, 3]
    assert "(3 training steps)" in (out / "index.html").read_text()
    assert "(2 training steps)" in (out / "pretrained" / "index.html").read_text()
    assert "pretrained by this trainer" in (out / "pretrained" / "index.html").read_text()
    assert "trained from nothing by launch.demo" in (out / "index.html").read_text()
    assert third["pretrained"]["scores"][0]["num_images"] == 4
    for a, b in zip(first["result"].images, third["pretrained"]["result"].images):
        assert a.shape == b.shape
        assert np.abs(a.astype(np.int32) - b.astype(np.int32)).mean() < 2.0
    with pytest.raises(CascadeError, match="lacks base/; pass --pretrained=''"):
        demo.run(str(out), num_prompts=4, steps=(2, 2, 2), bindings=TINY, progress=False,
                 pretrained=str(tmp_path))


def test_budget_shares_what_is_left_among_the_stages_still_to_train():
    left = 1000.0
    shares = demo.BUDGET_SHARES
    assert demo.training_seconds("base", left) == pytest.approx(left * shares["base"])
    # A stage that finished early left its time: the rest is split among those still to train.
    assert demo.training_seconds("sr128", left, ("base",)) == pytest.approx(
        left * shares["sr128"] / (shares["sr128"] + shares["sr512"]))
    assert demo.training_seconds("sr512", left, ("base", "sr128")) == pytest.approx(left)
    assert demo.training_seconds("sr512", -5.0, ("base", "sr128")) == 0.0
