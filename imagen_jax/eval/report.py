"""Offline HTML for DrawBench runs: a browsable report and the side-by-side rating page.

Both pages are single self-contained files (inline CSS/JS, no network): images are either
referenced by relative path (the page travels with its run directory) or embedded as base64
data URIs (``embed=True``: one file to mail to raters). The pages are the jinja2 templates
``drawbench_report.html.j2`` and ``side_by_side.html.j2`` (``imagen_jax/eval/templates/``),
written through :func:`imagen_jax.eval.samples.write_samples`.

Side-by-side mode reproduces the paper's human evaluation (Imagen, Section 4.2 / Appendix D.2):
for every prompt a rater sees the two models' image sets, left/right randomised per prompt, and
answers "Which set of images better represents the text caption?" (alignment) and "Which set of
images is more photorealistic?" (fidelity) with left / right / indifferent. The page's
"Save choices" button downloads the answers as JSON, already mapped back to run labels;
:func:`tally_choices` aggregates any number of such files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from imagen_jax.eval.drawbench import category_slug, load_run
from imagen_jax.eval.samples import Page, data_uri, write_samples

REPORT_FILE = "index.html"
SIDE_BY_SIDE_FILE = "side_by_side.html"
ASSIGNMENT_FILE = "assignment.json"
QUESTIONS = {
    "alignment": "Which set of images better represents the text caption?",
    "fidelity": "Which set of images is more photorealistic (looks more real)?",
}
ANSWERS = (("left", "Left"), ("right", "Right"), ("tie", "Indifferent"))  # (value, button)
REPORT_THUMB_PX = 128
SIDE_BY_SIDE_THUMB_PX = 160


def _img_src(run_dir: str, rel: str, page_dir: str, embed: bool) -> str:
    """An image's ``src``: its path relative to the page, or its bytes as a data URI."""
    path = os.path.join(run_dir, rel)
    if embed:
        with open(path, "rb") as f:
            return data_uri(f.read())
    return os.path.relpath(path, page_dir).replace(os.sep, "/")


def write_report(
    run_dir: str, *, embed: bool = False, thumb: int = REPORT_THUMB_PX, title: str | None = None
) -> str:
    """Writes ``run_dir/index.html`` (per category: prompts, images, scores); returns its path.

    Raises ``FileNotFoundError`` when ``run_dir`` holds no DrawBench ``run.json``.
    """
    run = load_run(run_dir)
    categories: dict[str, list[dict]] = {}
    for e in run["prompts"]:
        categories.setdefault(e["category"], []).append(e)
    grids = run.get("grids", {})
    context = {
        "title": title or f"DrawBench: {run['label']}",
        "thumb": thumb,
        "num_prompts": len(run["prompts"]),
        "num_per_prompt": run["num_per_prompt"],
        "seed": run["seed"],
        "settings": json.dumps(run.get("settings", {})),
        "metrics": run.get("metrics", []),
        "means": [(g, run.get("category_means", {}).get(g, {})) for g in ["all", *categories]],
        "categories": [
            {
                "name": category,
                "slug": category_slug(category),
                "grid": _img_src(run_dir, grids[category], run_dir, False)
                if grids.get(category) else None,
                "entries": [
                    {**e, "images": [_img_src(run_dir, rel, run_dir, embed) for rel in e["images"]]}
                    for e in entries
                ],
            }
            for category, entries in categories.items()
        ],
    }
    page = Page("drawbench_report.html.j2", context)
    return write_samples(run_dir, pages={REPORT_FILE: page})[REPORT_FILE]


def write_side_by_side(
    run_a: str,
    run_b: str,
    out_dir: str,
    *,
    seed: int = 0,
    embed: bool = False,
    thumb: int = SIDE_BY_SIDE_THUMB_PX,
) -> str:
    """Writes the rating page comparing two DrawBench runs (prompts both runs have).

    Left/right is drawn per prompt from ``random.Random(seed)``; ``assignment.json`` next to the
    page records it (the downloaded choices are already decoded to A/B). Raises ``ValueError``
    when the runs share no prompt, ``FileNotFoundError`` when a directory holds no run.
    """
    a, b = load_run(run_a), load_run(run_b)
    b_by_index = {e["index"]: e for e in b["prompts"]}
    pairs = [(ea, b_by_index[ea["index"]]) for ea in a["prompts"] if ea["index"] in b_by_index]
    if not pairs:
        raise ValueError(f"runs {run_a!r} and {run_b!r} share no DrawBench prompts")
    rng = random.Random(seed)
    labels = {"A": a["label"], "B": b["label"]}
    items, shown = [], []
    for ea, eb in pairs:
        left = rng.choice("AB")
        sides = {"A": (run_a, ea), "B": (run_b, eb)}
        order = [left, "B" if left == "A" else "A"]
        items.append(
            {"index": ea["index"], "prompt": ea["prompt"], "category": ea["category"], "left": left}
        )
        panes = []
        for position, key in zip(("left", "right"), order):
            run_dir, entry = sides[key]
            panes.append({"position": position,
                          "images": [_img_src(run_dir, rel, out_dir, embed)
                                     for rel in entry["images"]]})
        shown.append({**items[-1], "panes": panes})
    context = {
        "title": "DrawBench side by side",
        "thumb": thumb,
        "pairs": shown,
        "questions": QUESTIONS,
        "answers": ANSWERS,
        "items": items,
        "labels": labels,
    }
    assignment = {"seed": seed, "runs": {"A": run_a, "B": run_b}, "labels": labels,
                  "items": items}
    written = write_samples(
        out_dir, manifest=assignment, manifest_file=ASSIGNMENT_FILE,
        pages={SIDE_BY_SIDE_FILE: Page("side_by_side.html.j2", context)},
    )
    return written[SIDE_BY_SIDE_FILE]


def tally_choices(paths: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Aggregates downloaded choice files: per question, the share of A, B and tie answers.

    ``A_preference`` is the preference rate of run A with "indifferent" counted as half a vote
    for each side (our convention for turning three-way answers into the paper's two-model
    preference rates, Section 4.2 / Figure 3).
    """
    counts = {q: {"A": 0, "B": 0, "tie": 0} for q in QUESTIONS}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for c in data["choices"]:
            for q in QUESTIONS:
                if c.get(q) in ("A", "B", "tie"):
                    counts[q][c[q]] += 1
    out: dict[str, dict[str, float | int]] = {}
    for q, cnt in counts.items():
        n = sum(cnt.values())
        out[q] = {
            **cnt,
            "n": n,
            "A_preference": (cnt["A"] + 0.5 * cnt["tie"]) / n if n else float("nan"),
        }
    return out
