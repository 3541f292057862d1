"""DrawBench (Imagen, Section 4.2 / Appendix D.2): sample every prompt, grids, scores, run.json.

The runner is sampler-agnostic: it takes ``sample_fn(prompts, seed) -> uint8 [N, H, W, 3]``
(``imagen_jax.cascade.Cascade.sample_fn`` or anything else). Prompts are sampled in fixed
batches; batch ``b`` always uses seed ``seed + b`` and a batch whose images are all on disk is
skipped, so an interrupted run resumes and reproduces the uninterrupted one.

Output layout of ``out_dir``::

    run.json                      settings, every prompt with its image paths and scores
    images/{index:03d}_{k}.png    sample k of prompt ``index`` (index = row in drawbench.csv)
    grids/{category}.png          per category: one row per prompt, one column per sample
    index.html                    the report (imagen_jax.eval.report.write_report)
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from imagen_jax.data.shapes import CaptionParseError
from imagen_jax.eval import shapes_score
from imagen_jax.eval.samples import write_samples

SampleFn = Callable[[list[str], int], np.ndarray]
# scorer(images uint8 [N, H, W, 3], prompts) -> float [N] (NaN where it does not apply).
Scorer = Callable[[np.ndarray, list[str]], np.ndarray]

# Section 4.2: 8 samples per prompt per model for the human evaluation.
PAPER_SAMPLES_PER_PROMPT = 8
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class DrawBenchPrompt:
    index: int  # row in drawbench.csv, stable across runs (pairs runs in side-by-side mode)
    prompt: str
    category: str


def load_prompts(
    categories: Sequence[str] | None = None, path: str | None = None
) -> list[DrawBenchPrompt]:
    """The 200 DrawBench prompts (11 categories) shipped in ``imagen_jax/assets/drawbench.csv``.

    ``categories`` filters by name (case-insensitive); an unknown name is an error listing the
    valid ones.
    """
    if path is None:
        text = (
            importlib.resources.files("imagen_jax")
            .joinpath("assets/drawbench.csv")
            .read_text(encoding="utf-8")
        )
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"Prompts", "Category"} <= set(rows[0]):
        raise ValueError("DrawBench csv must have the columns Prompts,Category")
    prompts = [DrawBenchPrompt(i, r["Prompts"], r["Category"]) for i, r in enumerate(rows)]
    if categories:
        known = {p.category.lower(): p.category for p in prompts}
        wanted = {c.strip().lower() for c in categories if c.strip()}
        unknown = sorted(wanted - set(known))
        if unknown:
            raise ValueError(
                f"unknown DrawBench categories {unknown}; choose from {sorted(set(known.values()))}"
            )
        prompts = [p for p in prompts if p.category.lower() in wanted]
    return prompts


def category_slug(category: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")


def image_relpath(index: int, k: int) -> str:
    return f"images/{index:03d}_{k}.png"


def make_grid(rows: Sequence[Sequence[np.ndarray]], cell: int, pad: int = 2) -> np.ndarray:
    """uint8 grid: ``rows[r][c]`` images resized to ``cell`` x ``cell``, white padding."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    grid = np.full((n_rows * (cell + pad) + pad, n_cols * (cell + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            im = Image.fromarray(image)
            if im.size != (cell, cell):
                im = im.resize((cell, cell), Image.BICUBIC)
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            grid[y : y + cell, x : x + cell] = np.asarray(im)
    return grid


def run_drawbench(
    sample_fn: SampleFn,
    out_dir: str,
    *,
    num_per_prompt: int = PAPER_SAMPLES_PER_PROMPT,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    prompts_per_batch: int = 8,
    scorers: Mapping[str, Scorer] | None = None,
    label: str = "",
    settings: Mapping[str, object] | None = None,
    grid_cell: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Samples every selected prompt ``num_per_prompt`` times; writes images, grids, run.json.

    ``sample_fn`` receives each batch's prompts repeated prompt-major (prompt 0's samples
    first) and must return one uint8 [H, W, 3] image per entry. Returns the run.json dict.
    """
    if num_per_prompt < 1 or prompts_per_batch < 1:
        raise ValueError("num_per_prompt and prompts_per_batch must be >= 1")
    prompts = load_prompts(categories)
    num_batches = math.ceil(len(prompts) / prompts_per_batch)
    sample_seconds = 0.0
    for b in range(num_batches):
        batch = prompts[b * prompts_per_batch : (b + 1) * prompts_per_batch]
        rels = [image_relpath(p.index, k) for p in batch for k in range(num_per_prompt)]
        if all(os.path.exists(os.path.join(out_dir, rel)) for rel in rels):
            continue  # done before an interruption
        texts = [p.prompt for p in batch for _ in range(num_per_prompt)]
        start = time.perf_counter()
        images = np.asarray(sample_fn(texts, seed + b))
        sample_seconds += time.perf_counter() - start
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(texts):
            raise ValueError(
                f"sample_fn must return uint8 [{len(texts)}, H, W, 3]; got {images.dtype} "
                f"{images.shape}"
            )
        # Atomic writes: a preempted run never leaves a truncated PNG behind.
        write_samples(out_dir, dict(zip(rels, images)))
        if progress is not None:
            progress(min((b + 1) * prompts_per_batch, len(prompts)), len(prompts))

    entries = []
    for p in prompts:
        entries.append(
            {
                "index": p.index,
                "prompt": p.prompt,
                "category": p.category,
                "images": [image_relpath(p.index, k) for k in range(num_per_prompt)],
                "scores": {},
            }
        )
    _score_entries(entries, out_dir, scorers or {})
    by_category: dict[str, list[dict]] = {}
    for e in entries:
        by_category.setdefault(e["category"], []).append(e)
    grids, grid_images = {}, {}
    for category, items in by_category.items():
        rows = [[_load(out_dir, rel) for rel in e["images"]] for e in items]
        grids[category] = f"grids/{category_slug(category)}.png"
        grid_images[grids[category]] = make_grid(rows, grid_cell)
    run = {
        "label": label or os.path.basename(os.path.abspath(out_dir)),
        "seed": seed,
        "num_per_prompt": num_per_prompt,
        "prompts_per_batch": prompts_per_batch,
        "settings": dict(settings or {}),
        "sample_seconds": sample_seconds,
        "metrics": sorted(scorers or {}),
        "category_means": category_means(entries),
        "grids": grids,
        "prompts": entries,
    }
    write_samples(out_dir, grid_images, manifest=run, manifest_file=RUN_FILE)
    return run


def _load(out_dir: str, rel: str) -> np.ndarray:
    with Image.open(os.path.join(out_dir, rel)) as im:
        return np.asarray(im.convert("RGB"))


def _score_entries(entries: list[dict], out_dir: str, scorers: Mapping[str, Scorer]) -> None:
    if not scorers:
        return
    for chunk_start in range(0, len(entries), 16):
        chunk = entries[chunk_start : chunk_start + 16]
        images = np.stack([_load(out_dir, rel) for e in chunk for rel in e["images"]])
        texts = [e["prompt"] for e in chunk for _ in e["images"]]
        for name, scorer in scorers.items():
            values = np.asarray(scorer(images, texts), np.float64).reshape(len(chunk), -1)
            for e, v in zip(chunk, values):
                e["scores"][name] = [None if np.isnan(x) else float(x) for x in v]


def category_means(entries: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """Mean of every score per category (ignoring None = not applicable), plus "all"."""
    out: dict[str, dict[str, float | None]] = {}
    groups: dict[str, list[dict]] = {"all": list(entries)}
    for e in entries:
        groups.setdefault(e["category"], []).append(e)
    for group, items in groups.items():
        names = sorted({n for e in items for n in e["scores"]})
        out[group] = {}
        for n in names:
            vals = [v for e in items for v in e["scores"].get(n, []) if v is not None]
            out[group][n] = float(np.mean(vals)) if vals else None
    return out


def load_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{run_dir!r} holds no {RUN_FILE}; run `python -m launch.evaluate drawbench "
            f"--out={run_dir}` first"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shapes_adherence_scorer(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Per-image exact-match adherence (``imagen_jax.eval.shapes_score``): 1.0 / 0.0.

    The metric needs no weights, so it is the default when no CLIP weights are given. It only
    applies to captions of the shapes grammar; other prompts (all of DrawBench) score NaN.
    """

    out = np.full(len(prompts), np.nan)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        try:
            out[i] = float(shapes_score.score_image(image, prompt).exact)
        except CaptionParseError:  # not a shapes caption: the metric does not apply
            continue
    return out
