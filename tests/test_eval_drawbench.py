"""DrawBench runner, HTML report (checked in headless Chromium), side-by-side page, launcher."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imagen_jax.eval import drawbench, report
from tests.support_eval import chromium_probe, stand_in_factory

STAND_IN = "tests.support_eval:stand_in_factory"  # --sample_fn of the launcher


def test_prompts_shipped():
    prompts = drawbench.load_prompts()
    assert len(prompts) == 200
    assert len({p.category for p in prompts}) == 11
    assert [p.index for p in drawbench.load_prompts(["colors"])] == list(range(25))
    with pytest.raises(ValueError, match="unknown DrawBench categories"):
        drawbench.load_prompts(["Colours"])


def test_all_200_prompts_report_opens_in_chromium(tmp_path):
    out = str(tmp_path / "run")
    calls = []

    def sample_fn(prompts, seed):
        calls.append((list(prompts), seed))
        return stand_in_factory()(prompts, seed)

    scorers = {"mean_brightness": lambda im, p: im.reshape(len(im), -1).mean(1) / 255}
    run = drawbench.run_drawbench(
        sample_fn, out, num_per_prompt=1, prompts_per_batch=50, scorers=scorers, label="stand-in"
    )
    assert len(calls) == 4 and [s for _, s in calls] == [0, 1, 2, 3]
    assert len(run["prompts"]) == 200 and run["prompts"][7]["prompt"] == calls[0][0][7]
    assert len(run["grids"]) == 11
    grid = np.asarray(Image.open(os.path.join(out, run["grids"]["Reddit"])))
    assert grid.shape == (38 * 130 + 2, 130 + 2, 3)  # 38 prompts x 1 sample, 128px + padding
    colors = [e for e in run["prompts"] if e["category"] == "Colors"]
    expected = np.mean(
        [np.asarray(Image.open(os.path.join(out, e["images"][0]))).mean() / 255 for e in colors]
    )
    assert run["category_means"]["Colors"]["mean_brightness"] == pytest.approx(expected)

    page = report.write_report(out)
    result = chromium_probe(page, tmp_path)
    assert result["total"] == 200 and result["loaded"] == 200

    embedded = report.write_report(out, embed=True)
    moved = str(tmp_path / "elsewhere.html")
    shutil.copy(embedded, moved)  # no image files next to it: must still be complete
    result = chromium_probe(moved, tmp_path)
    assert result["loaded"] == 200


def test_resume_reproduces_uninterrupted_run(tmp_path):
    kw = dict(num_per_prompt=2, categories=["Rare Words", "Conflicting"], prompts_per_batch=3)
    full = drawbench.run_drawbench(stand_in_factory(), str(tmp_path / "full"), **kw)
    calls = []

    def flaky(prompts, seed):
        if len(calls) == 2:
            raise RuntimeError("preempted")
        calls.append(seed)
        return stand_in_factory()(prompts, seed)

    with pytest.raises(RuntimeError, match="preempted"):
        drawbench.run_drawbench(flaky, str(tmp_path / "resumed"), **kw)
    seen = []

    def recording(prompts, seed):
        seen.append(seed)
        return stand_in_factory()(prompts, seed)

    resumed = drawbench.run_drawbench(recording, str(tmp_path / "resumed"), **kw)
    assert seen == [2, 3, 4, 5]  # 17 prompts / 3 per batch = 6 batches; 0 and 1 were done
    for a, b in zip(full["prompts"], resumed["prompts"], strict=True):
        for ra, rb in zip(a["images"], b["images"]):
            np.testing.assert_array_equal(
                np.asarray(Image.open(tmp_path / "full" / ra)),
                np.asarray(Image.open(tmp_path / "resumed" / rb)),
            )


def test_bad_sample_fn_output_is_named(tmp_path):
    with pytest.raises(ValueError, match="sample_fn must return uint8"):
        drawbench.run_drawbench(
            lambda p, s: np.zeros((len(p), 8, 8, 3), np.float32),
            str(tmp_path),
            num_per_prompt=1,
            categories=["Text"],
        )


def test_side_by_side_page_records_choices(tmp_path):
    kw = dict(num_per_prompt=2, categories=["Misspellings"])
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    drawbench.run_drawbench(stand_in_factory(1.0), a, label="ckpt-A", **kw)
    drawbench.run_drawbench(stand_in_factory(5.0), b, label="ckpt-B", seed=7, **kw)
    page = report.write_side_by_side(a, b, str(tmp_path / "sbs"), seed=3)
    with open(tmp_path / "sbs" / "assignment.json") as f:
        assignment = json.load(f)
    lefts = [it["left"] for it in assignment["items"]]
    assert len(lefts) == 10 and set(lefts) == {"A", "B"}  # randomised sides

    # A rater who always clicks "Left" for alignment and "Indifferent" for fidelity.
    rate = """
    function probeExtra() {
      document.getElementById('rater').value = 'r1';
      const pick = (v, q) => document.querySelectorAll(`input[value="${v}"][name^="${q}_"]`);
      for (const el of pick('left', 'alignment')) el.click();
      for (const el of pick('tie', 'fidelity')) el.click();
      return collectChoices();
    }"""
    result = chromium_probe(page, tmp_path, rate)
    assert result["total"] == 40 and result["loaded"] == 40
    choices = result["extra"]
    assert choices["rater"] == "r1" and choices["runs"] == {"A": "ckpt-A", "B": "ckpt-B"}
    assert [c["alignment"] for c in choices["choices"]] == lefts
    assert all(c["fidelity"] == "tie" for c in choices["choices"])
    path = str(tmp_path / "choices.json")
    with open(path, "w") as f:
        json.dump(choices, f)
    tally = report.tally_choices([path])
    assert tally["alignment"]["A"] == lefts.count("A") and tally["alignment"]["n"] == 10
    assert tally["fidelity"]["A_preference"] == 0.5


def test_shapes_adherence_scorer():
    from imagen_jax.data import shapes

    scenes = [shapes.sample_scene("train", i) for i in range(3)]
    images = np.stack([shapes.render(s, 64) for s in scenes])
    prompts = [s.caption for s in scenes]
    got = drawbench.shapes_adherence_scorer(images, prompts)
    assert got.tolist() == [1.0, 1.0, 1.0]  # rendered ground truth adheres
    swapped = drawbench.shapes_adherence_scorer(images[::-1].copy(), prompts)
    assert np.nanmean(swapped) < 1.0
    assert np.isnan(drawbench.shapes_adherence_scorer(images[:1], ["A red colored car."])[0])


def test_launcher_drawbench_and_compare(tmp_path):
    from launch import evaluate

    def run(*args):
        try:
            rest = evaluate.parse_flags(["evaluate", *args])
            evaluate.main(rest)
        finally:
            evaluate.FLAGS.unparse_flags()

    run(
        "drawbench",
        f"--sample_fn={STAND_IN}",
        f"--out={tmp_path / 'a'}",
        "--num_per_prompt=1",
        "--categories=Counting,Positional",
        "--guidance=2",
    )
    run_a = drawbench.load_run(str(tmp_path / "a"))
    assert len(run_a["prompts"]) == 39 and run_a["settings"]["guidance"] == 2.0
    # No weights given: shapes adherence is the metric; it does not apply to DrawBench prompts.
    assert run_a["metrics"] == ["shapes_adherence"]
    assert os.path.exists(tmp_path / "a" / "index.html")
    run(
        "drawbench",
        f"--sample_fn={STAND_IN}",
        f"--out={tmp_path / 'b'}",
        "--num_per_prompt=1",
        "--categories=Counting",
        "--seed=1",
    )
    run("drawbench", f"--compare={tmp_path / 'a'},{tmp_path / 'b'}", f"--out={tmp_path / 'c'}")
    with open(tmp_path / "c" / "assignment.json") as f:
        assert len(json.load(f)["items"]) == 19  # the prompts both runs share
    with pytest.raises(Exception, match="--stages"):
        run("drawbench", f"--out={tmp_path / 'd'}")


def test_launcher_summary_says_what_was_scored(tmp_path, capsys):
    """No weights: the summary line names why shapes adherence has no value on DrawBench (its
    prompts are not shapes captions) instead of printing ``null``."""
    from launch import evaluate

    try:
        evaluate.main(evaluate.parse_flags([
            "evaluate", "drawbench", f"--sample_fn={STAND_IN}", f"--out={tmp_path}",
            "--num_per_prompt=1", "--categories=Colors"]))
    finally:
        evaluate.FLAGS.unparse_flags()
    summary, report_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "null" not in summary
    scores = json.loads(summary)
    assert scores["shapes_adherence"].startswith("n/a (not a shapes prompt set")
    assert "--clip_weights" in scores["shapes_adherence"]
    assert report_line == f"report: {tmp_path / 'index.html'}"
    # A metric that applied keeps its number; one that did not and has no note says n/a.
    assert evaluate.readable_scores({"clip_score": 0.25, "other": None, "fid": None},
                                    ["clip_score", "other"]) == {
        "clip_score": 0.25, "other": evaluate.NOT_APPLICABLE_DEFAULT, "fid": None}
