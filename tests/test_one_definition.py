"""Each list of valid settings is defined once in the package; every other module imports it.

A second copy drifts (a new prediction or weighting accepted in one place and refused in
another), so the literal tuples must occur exactly once under imagen_jax/ and launch/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imagen_jax import stage
from imagen_jax.diffusion import losses, predictions, settings, thresholding

REPO = Path(__file__).resolve().parents[1]
LISTS = {
    "predictions": (predictions.PREDICTIONS, "imagen_jax/diffusion/predictions.py"),
    "samplers": (settings.SAMPLERS, "imagen_jax/diffusion/settings.py"),
    "thresholdings": (thresholding.THRESHOLDINGS, "imagen_jax/diffusion/thresholding.py"),
    "loss weightings": (losses.WEIGHTINGS, "imagen_jax/diffusion/losses.py"),
}


def _tuple_literals(values: tuple[str, ...]) -> list[str]:
    """'path:line' of every tuple or list literal in the package equal to ``values``."""
    hits = []
    for path in sorted([*REPO.glob("imagen_jax/**/*.py"), *REPO.glob("launch/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                if tuple(e.value for e in node.elts) == tuple(values):
                    hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return hits


@pytest.mark.parametrize("name", LISTS)
def test_each_settings_list_is_written_once(name):
    values, home = LISTS[name]
    hits = _tuple_literals(values)
    assert len(hits) == 1 and hits[0].startswith(home + ":"), (name, hits)


def test_the_stage_record_reads_the_diffusion_lists():
    assert stage.PREDICTIONS is predictions.PREDICTIONS
    assert stage.WEIGHTINGS is losses.WEIGHTINGS


def _class_definitions(name: str) -> list[str]:
    """'path:line' of every ``class <name>`` in the package and the launchers."""
    hits = []
    for path in sorted([*REPO.glob("imagen_jax/**/*.py"), *REPO.glob("launch/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == name:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return hits


def _classes_with_fields(fields: set[str]) -> list[str]:
    """Classes whose annotated fields include all of ``fields`` (a copy of a record)."""
    hits = []
    for path in sorted([*REPO.glob("imagen_jax/**/*.py"), *REPO.glob("launch/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = {s.target.id for s in node.body
                         if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
                if fields <= names:
                    hits.append(f"{path.relative_to(REPO)}:{node.name}")
    return hits


def test_one_stage_record_and_one_sampling_config():
    """Issue 17: one `Stage`, one `SamplingConfig`, and no other record repeating their fields;
    the trainer, the cascade and the data pipeline's entry point read that one object."""
    import inspect

    from imagen_jax import cascade, diffusion
    from imagen_jax.train import trainer

    (stage_class,) = _class_definitions("Stage")
    assert stage_class.startswith("imagen_jax/stage.py:")
    assert len(_class_definitions("SamplingConfig")) == 1
    for gone in ("CascadeStage", "SamplerConfig"):
        assert _class_definitions(gone) == [], gone
    assert _classes_with_fields({"num_steps", "guidance_weight"}) == [
        "imagen_jax/diffusion/samplers.py:SamplingConfig"]
    assert _classes_with_fields({"prediction", "resolution"}) == ["imagen_jax/stage.py:Stage"]
    assert trainer.Stage is stage.Stage and cascade.Stage is stage.Stage
    assert stage.SamplingConfig is diffusion.SamplingConfig is cascade.SamplingConfig
    assert "stage" in inspect.signature(trainer.pipeline_data).parameters
