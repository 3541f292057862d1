"""Offline HTML for DrawBench runs: a browsable report and the side-by-side rating page.

Both pages are single self-contained files (inline CSS/JS, no network): images are either
referenced by relative path (the page travels with its run directory) or embedded as base64
data URIs (``embed=True``: one file to mail to raters).

Side-by-side mode reproduces the paper's human evaluation (Imagen, Section 4.2 / Appendix D.2):
for every prompt a rater sees the two models' image sets, left/right randomised per prompt, and
answers "Which set of images better represents the text caption?" (alignment) and "Which set of
images is more photorealistic?" (fidelity) with left / right / indifferent. The page's
"Save choices" button downloads the answers as JSON, already mapped back to run labels;
:func:`tally_choices` aggregates any number of such files.
"""

from __future__ import annotations

import base64
import html
import json
import os
import random
from collections.abc import Sequence

from imagen_jax.eval.drawbench import category_slug, load_run

REPORT_FILE = "index.html"
SIDE_BY_SIDE_FILE = "side_by_side.html"
QUESTIONS = {
    "alignment": "Which set of images better represents the text caption?",
    "fidelity": "Which set of images is more photorealistic (looks more real)?",
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-top:.6em}
.prompt{margin:1em 0;padding:.6em;background:#f7f7f7;border-radius:6px}
.prompt p{margin:.2em 0 .5em 0}
.imgs img{width:%(thumb)dpx;height:%(thumb)dpx;object-fit:contain;margin:2px;background:#ddd}
.scores{font-size:.85em;color:#555} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
nav a{margin-right:1em} .pair{display:flex;gap:1em} .side{flex:1;border:1px solid #ccc;padding:.4em}
.side h4{margin:.2em 0} fieldset{border:0;padding:.2em 0} .done{color:#080}
"""


def _img_src(run_dir: str, rel: str, page_dir: str, embed: bool) -> str:
    path = os.path.join(run_dir, rel)
    if embed:
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return os.path.relpath(path, page_dir).replace(os.sep, "/")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_report(
    run_dir: str, *, embed: bool = False, thumb: int = 128, title: str | None = None
) -> str:
    """Writes ``run_dir/index.html`` (per category: prompts, images, scores); returns its path."""
    run = load_run(run_dir)
    title = title or f"DrawBench: {run['label']}"
    categories: dict[str, list[dict]] = {}
    for e in run["prompts"]:
        categories.setdefault(e["category"], []).append(e)
    metrics = run.get("metrics", [])
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS % {'thumb': thumb}}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(run['prompts'])} prompts, {run['num_per_prompt']} samples each, seed "
        f"{run['seed']}. Settings: "
        f"<code>{html.escape(json.dumps(run.get('settings', {})))}</code></p>",
        "<nav>"
        + "".join(
            f"<a href='#{category_slug(c)}'>{html.escape(c)} ({len(v)})</a>"
            for c, v in categories.items()
        )
        + "</nav>",
    ]
    if metrics:
        means = run["category_means"]
        out.append(
            "<h2>Mean scores</h2><table><tr><th>category</th>"
            + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
            + "</tr>"
        )
        for group in ["all", *categories]:
            row = means.get(group, {})
            out.append(
                f"<tr><td>{html.escape(group)}</td>"
                + "".join(f"<td>{_fmt(row.get(m))}</td>" for m in metrics)
                + "</tr>"
            )
        out.append("</table>")
    for category, entries in categories.items():
        out.append(f"<h2 id='{category_slug(category)}'>{html.escape(category)}</h2>")
        grid = run.get("grids", {}).get(category)
        if grid:
            out.append(
                f"<p><a href='{_img_src(run_dir, grid, run_dir, False)}'>category grid</a></p>"
            )
        for e in entries:
            imgs = "".join(
                f"<img src='{_img_src(run_dir, rel, run_dir, embed)}' alt='sample {k}' "
                f"title='{html.escape(e['prompt'], quote=True)}'>"
                for k, rel in enumerate(e["images"])
            )
            scores = "; ".join(
                f"{html.escape(n)}: " + ", ".join("n/a" if v is None else f"{v:.2f}" for v in vals)
                for n, vals in e["scores"].items()
            )
            out.append(
                f"<div class='prompt' id='p{e['index']}'><p><b>#{e['index']}</b> "
                f"{html.escape(e['prompt'])}</p><div class='imgs'>{imgs}</div>"
                + (f"<div class='scores'>{scores}</div>" if scores else "")
                + "</div>"
            )
    out.append("</body></html>")
    path = os.path.join(run_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    return path


_SIDE_JS = """
const ITEMS = %(items)s;
const LABELS = %(labels)s;
function collectChoices() {
  const rater = document.getElementById('rater').value;
  const choices = ITEMS.map(item => {
    const out = {index: item.index, prompt: item.prompt, category: item.category,
                 left: item.left};
    for (const q of %(questions)s) {
      const el = document.querySelector(`input[name="${q}_${item.index}"]:checked`);
      // left/right -> run label, so the JSON needs no key to decode.
      out[q] = !el ? null : el.value === 'tie' ? 'tie'
               : el.value === 'left' ? item.left : (item.left === 'A' ? 'B' : 'A');
    }
    return out;
  });
  return {rater: rater, runs: LABELS, choices: choices};
}
function updateCount() {
  const data = collectChoices();
  const n = data.choices.filter(c => %(questions)s.every(q => c[q] !== null)).length;
  document.getElementById('count').textContent = `${n} / ${ITEMS.length} prompts rated`;
}
function saveChoices() {
  const blob = new Blob([JSON.stringify(collectChoices(), null, 1)], {type: 'application/json'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  const rater = document.getElementById('rater').value || 'anonymous';
  a.download = `drawbench_choices_${rater}.json`;
  document.body.appendChild(a); a.click(); a.remove();
}
document.addEventListener('change', updateCount);
"""


def write_side_by_side(
    run_a: str,
    run_b: str,
    out_dir: str,
    *,
    seed: int = 0,
    embed: bool = False,
    thumb: int = 160,
) -> str:
    """Writes the rating page comparing two DrawBench runs (prompts both runs have).

    Left/right is drawn per prompt from ``random.Random(seed)``; ``assignment.json`` next to the
    page records it (the downloaded choices are already decoded to A/B).
    """
    a, b = load_run(run_a), load_run(run_b)
    b_by_index = {e["index"]: e for e in b["prompts"]}
    pairs = [(ea, b_by_index[ea["index"]]) for ea in a["prompts"] if ea["index"] in b_by_index]
    if not pairs:
        raise ValueError(f"runs {run_a!r} and {run_b!r} share no DrawBench prompts")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    labels = {"A": a["label"], "B": b["label"]}
    items, body = [], []
    for ea, eb in pairs:
        left = rng.choice("AB")
        sides = {"A": (run_a, ea), "B": (run_b, eb)}
        order = [left, "B" if left == "A" else "A"]
        items.append(
            {"index": ea["index"], "prompt": ea["prompt"], "category": ea["category"], "left": left}
        )
        panes = []
        for pos, key in zip(("left", "right"), order):
            run_dir, entry = sides[key]
            imgs = "".join(
                f"<img src='{_img_src(run_dir, rel, out_dir, embed)}' alt='{pos} sample {k}'>"
                for k, rel in enumerate(entry["images"])
            )
            panes.append(
                f"<div class='side'><h4>{pos.title()}</h4><div class='imgs'>{imgs}</div></div>"
            )
        questions = "".join(
            f"<fieldset><b>{html.escape(text)}</b> "
            + "".join(
                f"<label><input type='radio' name='{q}_{ea['index']}' value='{v}'> {t}</label> "
                for v, t in (("left", "Left"), ("right", "Right"), ("tie", "Indifferent"))
            )
            + "</fieldset>"
            for q, text in QUESTIONS.items()
        )
        body.append(
            f"<div class='prompt' id='p{ea['index']}'><p><b>#{ea['index']}</b> "
            f"<i>{html.escape(ea['category'])}</i>: {html.escape(ea['prompt'])}</p>"
            f"<div class='pair'>{''.join(panes)}</div>{questions}</div>"
        )
    js = _SIDE_JS % {
        "items": json.dumps(items),
        "labels": json.dumps(labels),
        "questions": json.dumps(list(QUESTIONS)),
    }
    page = "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            "<title>DrawBench side by side</title>",
            f"<style>{_CSS % {'thumb': thumb}}</style></head><body>",
            "<h1>DrawBench side-by-side rating</h1>",
            f"<p>{len(pairs)} prompts. For each prompt pick the better set of images for each "
            "question (or Indifferent). Sides are shuffled per prompt. When done, press "
            "<b>Save choices</b> and send the downloaded JSON file.</p>",
            "<p><label>Rater name: <input id='rater' type='text'></label> "
            "<span id='count'></span></p>",
            *body,
            "<p><button id='save' type='button' onclick='saveChoices()'>Save choices</button></p>",
            f"<script>{js}</script><script>updateCount();</script></body></html>",
        ]
    )
    path = os.path.join(out_dir, SIDE_BY_SIDE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    with open(os.path.join(out_dir, "assignment.json"), "w") as f:
        json.dump(
            {"seed": seed, "runs": {"A": run_a, "B": run_b}, "labels": labels, "items": items},
            f,
            indent=1,
        )
    return path


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
