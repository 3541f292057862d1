"""bench/device_check.py: the dry run end to end, the MFU arithmetic against an analytic FLOP
count, the chip table, the time caps and the gin fallback (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from bench import device_check as dc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# The dry run: every part, every code path, tiny presets, CPU.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_measures_every_part(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--dry_run", f"--out_dir={tmp_path}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "device_check.json").read_text())
    parts = results["parts"]
    assert list(parts) == list(dc.PARTS)
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(dc.PARTS, "done")
    assert results["wall_s"] < wall + 1
    peak = dc.DRY.peak_flops

    # base64: cuDNN attention is refused on a CPU; remat on first does not fit the simulated
    # memory limit, then runs at the batch the memory analysis predicts.
    cudnn, remat = parts["base64"]["runs"]
    assert (cudnn["remat"], cudnn["attention"], cudnn["status"]) == (False, "cudnn",
                                                                     "unavailable")
    assert "cuDNN" in cudnn["attempts"][0]["error"]
    assert (remat["remat"], remat["attention"], remat["status"]) == (True, "xla", "ok")
    first = remat["attempts"][0]
    assert first["batch_per_device"] == 4 and first["fits"] is False and first["simulated_limit"]
    assert remat["attempts"][-1]["fits"] is True
    assert remat["batch_per_device"] < 4
    assert remat["batch_per_device"] <= first["predicted_max_batch_per_device"]
    for name in dc.TRAIN_PARTS:
        part = parts[name]
        assert part["devices"] == 2 and part["gin_parse"] == "minimal"
        run = part["runs"][-1]
        assert run["status"] == "ok" and run["loss_finite"]
        # Per-device arithmetic: global batch over 2 simulated devices.
        assert run["global_batch"] == 2 * run["batch_per_device"]
        assert run["images_per_s_per_device"] == pytest.approx(
            run["batch_per_device"] / run["step_s"])
        assert run["model_flops_per_step_per_device"] > 0
        assert run["mfu"] == pytest.approx(
            run["model_flops_per_step_per_device"] / run["step_s"] / peak)

    t5 = parts["t5"]["runs"][0]
    assert t5["status"] == "ok" and t5["tokens_per_s"] > 0
    assert t5["tokens_per_s"] == pytest.approx(t5["global_batch"] * t5["length"] / t5["seconds"])

    dpm, ddpm = parts["cascade"]["runs"]
    assert (dpm["sampler"], dpm["steps"], dpm["status"]) == ("dpmpp_2m", [2, 2, 2], "ok")
    assert dpm["final_shape"] == [2, 32, 32, 3]
    assert dpm["seconds_per_image"] == pytest.approx(dpm["seconds"] / 2)
    # The ancestral run asked for more than the (dry-run) time allows: fewer steps, said so.
    assert ddpm["status"] == "ok" and ddpm["steps_asked"] == [64, 32, 16]
    assert all(1 <= n < m for n, m in zip(ddpm["steps"], ddpm["steps_asked"]))
    assert ddpm["estimated_full_seconds"] > dc.DRY.cascade_max_run_s
    assert ddpm["estimate_basis"] == "per-stage FLOPs"
    assert ddpm["seconds_per_image_extrapolated_to_asked"] > ddpm["seconds_per_image"]
    assert any("instead" in line for line in results["lines"])

    table = (tmp_path / "device_check.md").read_text()
    for heading in ("## Training step", "## T5 encoder", "## Cascade sampling",
                    "## Peak device memory per part"):
        assert heading in table
    assert "| base64 |" in table and "| dpmpp_2m | 2/2/2 | 2/2/2 | 2 |" in table
    assert "| ddpm | 64/32/16 |" in table
    assert (tmp_path / "device_check.log").stat().st_size > 0


# ------------------------------------------------------------------------------------------
# The MFU arithmetic: XLA's FLOPs of one train step vs an analytic count.
# ------------------------------------------------------------------------------------------


def analytic_train_flops(channels: int, mult: tuple[int, ...], num_res_blocks: int,
                         attn_res: tuple[int, ...], res: int, head_dim: int, text_len: int,
                         text_dim: int, cond_dim: int, batch: int) -> float:
    """FLOPs of one training step of a `BaseUNet` from its config: convolutions, dense layers
    and attention matmuls, 2 FLOPs per multiply-add.

    Forward: a 3 x 3 conv from Cin to Cout channels on an r x r output costs 2 (3r - 2)^2 Cin
    Cout per example (its in-bounds taps; 9 r^2 with the zero padding), a 1 x 1 conv
    2 r^2 Cin Cout; a dense layer 2 Fin Fout per row; attention 2 T S D for the logits and as much
    for the weighted sum (T queries, S keys, D = heads x head_dim). Backward: twice the forward
    (the gradients of the input and of the weights), so 3x in all, except where the input needs
    no gradient (conv_in on x_t, the time MLP's first layer on sinusoid(t), the text projection
    on the given T5 embeddings): 2x. Not counted: norms, activations, softmax, the loss, the
    optimizer and EMA updates (elementwise, a few percent here).
    """
    b, embed, sinusoid = batch, 4 * channels, channels
    total = 0.0

    def op(fwd: float, input_grad: bool = True) -> None:
        nonlocal total
        total += fwd * (3 if input_grad else 2)

    # Conditioning: time MLP, text projection, attention pooling (4 heads, 1 query: the mean;
    # keys: null + mean + L tokens).
    op(2 * b * sinusoid * embed, input_grad=False)
    op(2 * b * embed * embed)
    op(2 * b * text_len * text_dim * cond_dim, input_grad=False)
    op(2 * b * cond_dim * cond_dim)  # query
    op(2 * 2 * b * (1 + text_len) * cond_dim * cond_dim)  # key, value
    op(2 * 2 * b * (text_len + 2) * cond_dim)  # logits + weighted sum
    op(2 * b * cond_dim * embed)  # out

    def conv3(r: int) -> int:
        """In-bounds taps of a 3x3 'SAME' conv over an r x r map: (3r - 2)^2, not 9 r^2 (a
        border output has fewer neighbours; XLA's cost analysis counts no multiply by the
        zero padding)."""
        return (3 * r - 2) ** 2

    def resblock(cin: int, cout: int, r: int) -> None:  # r: the side its convs run at
        op(2 * b * embed * 2 * cout)  # scale / shift projection
        op(2 * b * conv3(r) * cin * cout)
        op(2 * b * conv3(r) * cout * cout)
        if cin != cout:
            op(2 * b * r * r * cin * cout)  # 1x1 shortcut

    def attention(c: int, r: int) -> None:
        t = r * r
        s = t + 1 + text_len  # image keys + null + text tokens
        op(3 * 2 * b * t * c * c)  # q, k, v
        op(2 * 2 * b * text_len * cond_dim * c)  # text k, v
        op(2 * 2 * b * t * s * c)  # logits + weighted sum
        op(2 * b * t * c * c)  # out

    c0 = channels * mult[0]
    op(2 * b * conv3(res) * 3 * c0, input_grad=False)  # conv_in
    h, skips = c0, [c0]
    for level, m in enumerate(mult):
        ch, r = channels * m, res // 2**level
        for _ in range(num_res_blocks):
            resblock(h, ch, r)
            h = ch
            if r in attn_res:
                attention(ch, r)
            skips.append(ch)
        if level != len(mult) - 1:
            resblock(ch, ch, r // 2)  # BigGAN-style downsampling block: convs after the pool
            skips.append(ch)
    r = res // 2 ** (len(mult) - 1)
    resblock(h, h, r)
    attention(h, r)
    resblock(h, h, r)
    for level in reversed(range(len(mult))):
        ch, r = channels * mult[level], res // 2**level
        for _ in range(num_res_blocks + 1):
            resblock(h + skips.pop(), ch, r)
            h = ch
            if r in attn_res:
                attention(ch, r)
        if level != 0:
            resblock(ch, ch, 2 * r)  # upsampling block: convs after the repeat
    op(2 * b * conv3(res) * c0 * 3)  # conv_out
    return total


def test_model_flops_match_analytic_count():
    from imagen_jax import partitioning
    from imagen_jax.stage import Stage
    from imagen_jax.train import optim, state, step, testing

    cfg = dict(channels=64, mult=(1, 2), num_res_blocks=1, attn_res=(8,), res=16, head_dim=32,
               text_len=8, text_dim=32, cond_dim=64)
    model = testing.tiny_base(channels=cfg["channels"], channel_mult=cfg["mult"],
                              num_res_blocks=cfg["num_res_blocks"],
                              attn_resolutions=cfg["attn_res"], head_dim=cfg["head_dim"],
                              text_embed_dim=cfg["text_dim"], text_cond_dim=cfg["cond_dim"],
                              image_size=cfg["res"], num_groups=8)
    stage = Stage(model=model, resolution=cfg["res"], text_length=cfg["text_len"],
                  text_embed_dim=cfg["text_dim"])
    schedule = optim.learning_rate_schedule()
    tx = optim.make_optimizer(schedule, name="adam")
    mesh, rules = partitioning.make_mesh(), partitioning.DATA_PARALLEL_RULES
    abstract, _ = state.abstract_train_state(model, tx, stage, mesh, rules)
    batch = 2
    xla = dc.model_flops_per_step(stage, tx, schedule, step.StepConfig(), rules, abstract, batch)
    analytic = analytic_train_flops(**cfg, batch=batch)
    assert xla == pytest.approx(analytic, rel=0.10), (xla, analytic, xla / analytic)
    # Linear in the batch (the optimizer's share aside), as the per-device figures assume.
    xla4 = dc.model_flops_per_step(stage, tx, schedule, step.StepConfig(), rules, abstract, 4)
    assert xla4 / xla == pytest.approx(2.0, rel=0.05)


# ------------------------------------------------------------------------------------------
# Chip table, flag parsing, time caps, gin.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
])
def test_peak_table(kind, peak):
    assert dc.peak_bf16_flops(kind)[0] == peak


def test_peak_unknown_chip_says_how_to_fix():
    flops, reason = dc.peak_bf16_flops("NVIDIA GeForce RTX 4090")
    assert flops is None and "--peak_flops" in reason


def test_bad_grid_and_caps_name_the_fix():
    assert dc.parse_grid(["off:cudnn", "on:xla"]) == ((False, "cudnn"), (True, "xla"))
    assert dc.parse_caps(["base64=150", "t5=20"]) == {"base64": 150.0, "t5": 20.0}
    with pytest.raises(ValueError, match="remat:attention"):
        dc.parse_grid(["on:flash"])
    with pytest.raises(ValueError, match="PART=SECONDS"):
        dc.parse_caps(["unet=10"])
    with pytest.raises(ValueError, match="not a number"):
        dc.parse_caps(["t5=soon"])


def test_caps_carry_unused_time_forward():
    caps = {"a": 10.0, "b": 20.0, "c": 30.0}
    assert dc.schedule_caps(["a", "b", "c"], caps, 0.0, 60.0, 0.0) == 10.0
    # "a" took 4 s of its 10: "b" gets its 20 plus the 6 left over.
    assert dc.schedule_caps(["b", "c"], caps, 0.0, 60.0, 4.0) == 26.0
    # An overrun never pushes a part past the total budget.
    assert dc.schedule_caps(["c"], caps, 0.0, 60.0, 55.0) == 5.0
    assert dc.schedule_caps(["c"], caps, 0.0, 60.0, 70.0) == 0.0


def test_child_cut_at_its_cap_keeps_its_results_and_later_parts_are_skipped(tmp_path):
    # A stand-in child: writes one result as a real part does, then hangs.
    script = textwrap.dedent("""
        import json, sys, time
        cfg = json.load(open(sys.argv[1]))
        json.dump({"part": cfg["part"], "runs": [{"status": "ok", "x": 1}],
                   "lines": ["measured one thing"], "status": "running"},
                  open(cfg["result_file"], "w"))
        print("child started", flush=True)
        time.sleep(60)
    """)
    preset = dc.dataclasses.replace(dc.DRY, kill_grace_s=0.5, min_part_s=0.5)
    t0 = time.time()
    results = dc.run_parent(["t5", "cascade"], preset, str(tmp_path), budget_s=2.0,
                            caps={"t5": 1.0, "cascade": 0.0}, grid=None, peak_flops=None,
                            seed=0, child_cmd=lambda cfg: [sys.executable, "-c", script, cfg])
    assert time.time() - t0 < 30
    t5 = results["parts"]["t5"]
    assert t5["status"] == "cut at time cap" and t5["runs"] == [{"status": "ok", "x": 1}]
    assert results["parts"]["cascade"]["status"] == "skipped"
    assert any(line.startswith("cascade: skipped") for line in results["lines"])
    assert "t5: measured one thing" in results["lines"]
    written = json.loads((tmp_path / "device_check.json").read_text())
    assert written["parts"]["t5"]["runs"] == t5["runs"]
    assert "child started" in (tmp_path / "device_check.log").read_text()


def test_part_skips_grid_points_past_its_deadline(tmp_path):
    result = tmp_path / "base64.json"
    config = {"part": "base64", "dry_run": True, "seed": 0, "deadline": time.time() - 1,
              "result_file": str(result), "peak_flops": None, "grid": None}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    dc.run_worker(str(config_path))
    data = json.loads(result.read_text())
    assert data["status"] == "done"
    assert [r["status"] for r in data["runs"]] == ["skipped: time cap"] * 2
    assert all("skipped" in line for line in data["lines"][-2:])


@pytest.mark.parametrize("gin_file", ["base64.gin", "sr256.gin", "sr1024.gin"])
def test_minimal_gin_parse_builds_the_same_stage_as_full_registration(gin_file):
    # The real run parses the paper stages with only the model / stage / optimizer
    # configurables registered (the H200 image has no grain or tensorflow-datasets).
    from imagen_jax import partitioning

    minimal = dc.load_stage(gin_file)
    full = dc.load_stage(gin_file, full_registration=True)
    assert (minimal["parse"], full["parse"]) == ("minimal", "full")
    assert minimal["stage"] == full["stage"]
    assert minimal["stage"].model.dtype == "bfloat16"
    assert minimal["stage"].model.param_dtype == "float32"
    assert minimal["rules"] == full["rules"] == tuple(partitioning.FSDP_RULES)
    assert dict(minimal["mesh"].shape) == dict(full["mesh"].shape)
    assert minimal["step_config"] == full["step_config"]
    assert type(minimal["tx"]) is type(full["tx"])
