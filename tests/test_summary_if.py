"""``python -m launch.summary --if_config=PATH`` (issue 18, must-show 6): a DeepFloyd IF U-Net's
parameter count and FLOPs per step from its diffusers config.json alone (no weights; eval_shape).

The reference count is diffusers' own: ``sum(p.numel() for p in
UNet2DConditionModel(**config).parameters())`` on two tiny configs with IF-I-XL's and IF-II-L's
options (the published config.json files are not on this machine).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import diffusers  # test-extra reference: plainly imported, a broken install fails, not skips
import pytest

from imagen_jax import cascade
from launch import summary
from tests.test_if_unet import STAGE_I, STAGE_II

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(config: dict, model_dir) -> tuple[str, int]:
    """Writes ``model_dir/unet/config.json`` as ``save_pretrained`` does (no weights); returns
    its path and diffusers' parameter count."""
    model = diffusers.UNet2DConditionModel(**config)
    model.save_config(str(model_dir / "unet"))
    return str(model_dir / "unet" / "config.json"), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,config", [("IF-I-tiny", STAGE_I), ("IF-II-tiny", STAGE_II)])
def test_parameter_count_equals_diffusers(tmp_path, name, config):
    path, want = _write_config(config, tmp_path / name)
    assert os.listdir(os.path.dirname(path)) == ["config.json"]  # no weights
    for form in (path, str(tmp_path / name), f"{cascade.IF_PREFIX}{tmp_path / name}"):
        stage = summary.load_if_config_stage(form)
        assert stage.name == name and stage.is_discrete
        assert summary.count_params(summary.abstract_params(stage)) == want
    params = summary.abstract_params(stage)
    sample = summary.sample_step_flops(stage, params, "lowered")
    train = summary.train_step_flops(stage, params, "lowered")
    assert 0 < sample < train
    rows = summary.layout_rows(stage, params)
    assert len(rows) == len(config["block_out_channels"])
    assert sum(float(r[-1]) for r in rows) * 1e6 <= want


def test_summary_command_prints_the_if_count(tmp_path):
    path, want = _write_config(STAGE_II, tmp_path / "IF-II-tiny")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.summary", f"--if_config={path}", "--flops=lowered"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model: IFUNet  parameters: {want:,} " in proc.stdout, proc.stdout
    assert re.search(r"sampling step \(guided, cond\+uncond\): [\d,.]+ GFLOPs", proc.stdout)
    assert "text: 77 x 24" in proc.stdout
