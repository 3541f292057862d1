"""Must show 5: `launch.summary` sizes of the paper stages, FLOPs and layout on a tiny stage.

Issue 17 (one stage record): the summary describes the `Stage` the trainer builds from the same
gin files, not a record of its own.
"""

import ast
from pathlib import Path

import gin
import pytest

from imagen_jax import gin_utils, stage
from launch import summary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("gin_file, low, high", [
    ("gin_configs/base64.gin", 1.8e9, 2.2e9),  # App. F.1: 2 B
    ("gin_configs/sr256.gin", 0.5e9, 0.7e9),  # App. F.2: 600 M
    ("gin_configs/sr1024.gin", 0.35e9, 0.45e9),  # App. F.3: 400 M
])
def test_paper_stage_parameter_counts(gin_file, low, high):
    spec = summary.load_stage([gin_file])
    n_params = summary.count_params(summary.abstract_params(spec))
    assert low <= n_params <= high, f"{gin_file}: {n_params / 1e9:.3f} B parameters"


def test_gin_override_changes_the_count():
    spec = summary.load_stage(["gin_configs/sr1024.gin"], [
        "EfficientUNet.blocks = [[128, 2], [256, 4], [512, 8]]",
        "EfficientUNet.self_attention = [False, False, False]",
        "EfficientUNet.cross_attention = [False, False, True]",
    ])
    assert summary.count_params(summary.abstract_params(spec)) < 0.2e9


def test_tiny_stage_flops_and_layout():
    spec = summary.load_stage(["gin_configs/tiny/base.gin"])
    params = summary.abstract_params(spec)
    train = summary.train_step_flops(spec, params, "lowered")
    sample = summary.sample_step_flops(spec, params, "lowered")
    # Backward costs about twice the forward: fwd+bwd of one example ~ 3x a forward, and a
    # guided sampling step is 2 forwards (cond + uncond) at the same resolution here.
    assert 1.0 < train / (sample / 2) < 4.0
    rows = summary.layout_rows(spec, params)
    assert [r[0] for r in rows] == ["16x16", "8x8"]
    assert rows[1][3] == "self+text" and rows[0][3] == "-"
    text = summary.format_summary(spec, summary.count_params(params), rows, {"train": train})
    assert "BaseUNet" in text and "GFLOPs" in text


def test_files_without_a_stage_give_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("BaseUNet.channels = 16\n")
    with pytest.raises(gin_utils.GinConfigError, match="model.*\n.*stage's gin file"):
        summary.load_stage([str(bad)])
    # A model file alone (its macros, no Stage bindings) is not a stage either.
    with pytest.raises(gin_utils.GinConfigError, match="Stage.model"):
        summary.load_stage(["gin_configs/tiny/models/tiny_sr.gin"])
    with pytest.raises(gin_utils.GinConfigError, match="cond_drop_prob"):  # Stage's own check
        summary.load_stage(["gin_configs/tiny/base.gin"], ["Stage.cond_drop_prob = 2.0"])


def test_an_undefined_macro_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("Stage.model = %MODEL\n")
    with pytest.raises(gin_utils.GinConfigError, match="MODEL"):
        summary.load_stage([str(bad)])


@pytest.mark.parametrize("gin_file, train, train_low, text", [
    ("gin_configs/tiny/sr.gin", 64, 16, 48),  # trains on whole 64 px images
    ("gin_configs/tiny/sr_crop.gin", 32, 8, 48),  # on 32 px crops with their 8 px copies
    ("gin_configs/sr1024.gin", 256, 64, 128),  # App. F.3: 256 crops, 64 px copies
])
def test_the_summary_reads_the_trainers_stage(gin_file, train, train_low, text):
    spec = summary.load_stage([gin_file])
    assert type(spec) is stage.Stage
    assert spec == stage.Stage()  # what `train.stage = @Stage()` hands the trainer
    inputs = summary.abstract_inputs(spec, 1)
    assert inputs["x"].shape == (1, train, train, 3)
    assert inputs["lowres"].shape == (1, train_low, train_low, 3)
    assert inputs["text_embeds"].shape == (1, text, spec.text_embed_dim)
    full = summary.abstract_inputs(spec, 2, full_size=True)
    low = spec.lowres_resolution
    assert full["x"].shape == (2, spec.resolution, spec.resolution, 3)
    assert full["lowres"].shape == (2, low, low, 3) and full["text_mask"].shape == (2, text)


def test_no_second_stage_record_in_the_launchers():
    """No class under launch/ repeats the stage's model and resolution fields."""
    for path in sorted(REPO.glob("launch/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = {s.target.id for s in node.body
                         if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
                assert not {"model", "resolution"} <= names, f"{path.name}: {node.name}"
