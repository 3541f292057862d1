"""Guidance sweep: FID and CLIP score per classifier-free guidance weight, and the Pareto plot.

Imagen's Figure 4 (Section 4.1) plots COCO FID against CLIP score over guidance weights
[1, 1.25, 1.5, 1.75, 2, 3, ..., 10] (Appendix, base model sweep): more guidance raises image-text
alignment (CLIP score) until fidelity (FID) degrades. Every point's samples live in their own
resumable :class:`~imagen_jax.eval.fid.SampleStore`, and ``sweep.json`` is rewritten after each
point, so a preempted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from imagen_jax.eval.fid import FeatureStats, SampleFn, SampleStore, fid_from_stats

# Section 4.1 / Figure 4: the base model's guidance sweep.
PAPER_BASE_GUIDANCE = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
SWEEP_FILE = "sweep.json"

Scorer = Callable[[np.ndarray, list[str]], np.ndarray]


def run_guidance_sweep(
    make_sample_fn: Callable[[float], SampleFn],
    guidances: Sequence[float],
    prompts: Sequence[str],
    out_dir: str,
    *,
    num_samples: int,
    chunk_size: int = 64,
    seed: int = 0,
    feature_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    feature_dim: int = 2048,
    reference: FeatureStats | None = None,
    extractor_id: str = "",
    scorers: dict[str, Scorer] | None = None,
    settings: dict | None = None,
) -> list[dict]:
    """For each guidance weight: sample ``num_samples`` images, compute FID and mean scores.

    ``make_sample_fn(w)`` returns the sampler at guidance weight ``w``. FID is computed when
    ``feature_fn`` and ``reference`` are given; ``scorers`` (e.g. ``{"clip_score": ...,
    "shapes_adherence": ...}``) are averaged over the samples (NaN entries ignored).
    Returns the points (also written to ``out_dir/sweep.json``).
    """
    if (feature_fn is None) != (reference is None):
        raise ValueError("FID needs both feature_fn and reference statistics (or neither)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SWEEP_FILE)
    done: dict[float, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for p in json.load(f)["points"]:
                if p["num_samples"] == num_samples:
                    done[float(p["guidance"])] = p
    points = []
    for w in guidances:
        w = float(w)
        if w in done:
            points.append(done[w])
            continue
        store = SampleStore(
            os.path.join(out_dir, f"guidance_{w:g}"),
            chunk_size=chunk_size,
            seed=seed,
            settings={**(settings or {}), "guidance": w, "num_prompts": len(prompts)},
        )
        store.fill(make_sample_fn(w), prompts, num_samples)
        point: dict = {"guidance": w, "num_samples": num_samples}
        stats = FeatureStats.empty(feature_dim, extractor=extractor_id) if feature_fn else None
        sums = {name: [0.0, 0] for name in scorers or {}}
        for images, chunk_prompts in store.iter_chunks():
            if stats is not None:
                stats.update(feature_fn(images))
            for name, scorer in (scorers or {}).items():
                values = np.asarray(scorer(images, chunk_prompts), np.float64)
                sums[name][0] += float(np.nansum(values))
                sums[name][1] += int(np.sum(~np.isnan(values)))
        if stats is not None:
            point["fid"] = fid_from_stats(stats, reference)
        for name, (total, count) in sums.items():
            point[name] = total / count if count else None
        points.append(point)
        _write(path, points, settings)
    _write(path, points, settings)
    return points


def _write(path: str, points: list[dict], settings: dict | None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": settings or {}, "points": points}, f, indent=1)
    os.replace(tmp, path)


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of points not dominated when maximising x and minimising y, by increasing x."""
    idx = [
        i
        for i in range(len(xs))
        if not any(
            xs[j] >= xs[i] and ys[j] <= ys[i] and (xs[j] > xs[i] or ys[j] < ys[i])
            for j in range(len(xs))
        )
    ]
    return sorted(idx, key=lambda i: xs[i])


def plot_sweep(points: Sequence[dict], path: str, *, title: str = "Guidance sweep") -> str:
    """Writes the sweep plot (PNG) and returns ``path``.

    With FID and CLIP score: FID against CLIP score, one point per guidance weight, the Pareto
    front highlighted (the paper's Figure 4). Otherwise every available metric against the
    guidance weight (e.g. shapes adherence when no feature-extractor weights were given).
    """
    import matplotlib  # optional plotting dependency, loaded only to draw the curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional plotting dependency, loaded only to draw the curve

    def has(key):
        return all(p.get(key) is not None and not math.isnan(p[key]) for p in points)

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    guid = [p["guidance"] for p in points]
    if has("fid") and has("clip_score"):
        xs, ys = [p["clip_score"] for p in points], [p["fid"] for p in points]
        ax.plot(xs, ys, "o-", color="tab:blue", label="guidance sweep")
        front = pareto_front(xs, ys)
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            "s",
            mfc="none",
            ms=11,
            color="tab:red",
            label="Pareto front",
        )
        for x, y, w in zip(xs, ys, guid):
            ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("CLIP score (higher: better alignment)")
        ax.set_ylabel("FID (lower: better fidelity)")
        ax.legend()
    else:
        metrics = [k for k in ("fid", "clip_score", "shapes_adherence") if has(k)]
        metrics += sorted(
            k
            for k in points[0]
            if k not in ("guidance", "num_samples", *metrics)
            and has(k)
            and isinstance(points[0][k], int | float)
        )
        if not metrics:
            raise ValueError("sweep points carry no metric to plot")
        for k in metrics:
            ax.plot(guid, [p[k] for p in points], "o-", label=k)
        ax.set_xlabel("guidance weight w (1 = no guidance)")
        ax.set_ylabel("metric")
        ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
