"""Issue 15 (sections 1-2): bad settings and non-finite pixels never become black images.

Settings: every sampler / guidance / thresholding / augmentation setting is validated where the
config is built (the one ``SamplingConfig`` of every ``Stage``, ``Stage.with_sampling``, gin's
per-stage ``SamplingConfig`` bindings, the launchers' flags), by one function
(``imagen_jax.diffusion.check_sampling_settings``), with a one-line error naming the setting and
its valid range. Pixels: NaN/Inf in low-res inputs, FID reference images and dataset images is
refused naming the image; a stage that samples NaN (a diverged checkpoint: NaN in its
parameters) stops the cascade with an error naming the stage, and no PNG is written. The
launchers print one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from unittest import mock

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax import cascade, gin_utils, partitioning
from imagen_jax.data import pipeline
from imagen_jax.data.images import NonFiniteImageError
from imagen_jax.diffusion import SamplingConfig
from imagen_jax.errors import ConfigError
from imagen_jax.eval import fid
from imagen_jax.stage import Stage
from imagen_jax.train.testing import gin_model_bindings, tiny_base, tiny_sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")
EMBED_DIM = 16
TEXT_LEN = 4


def _one_line(e: BaseException | str) -> str:
    """The message, asserted to be one line. gin adds an "In call to configurable X" line to
    errors raised while constructing a configurable (SamplingConfig, Stage); that line is its
    own, so it is dropped first (the launchers fold everything into one line)."""
    text = str(e.code if isinstance(e, SystemExit) else e)
    lines = [line for line in text.splitlines() if "In call to configurable" not in line]
    assert len(lines) == 1, f"message is not one line: {text!r}"
    return lines[0]


# ------------------------------------------------------------------ 1. sampler settings


@pytest.mark.parametrize(
    "value, shown", [(NAN, "nan"), (INF, "inf"), (-INF, "-inf"), (-0.5, "-0.5")]
)
def test_non_finite_or_negative_guidance_is_refused(value, shown):
    # The case is NaN: a `w < 0` check is False for NaN, so it used to pass.
    with pytest.raises(ConfigError,
                       match=rf"SamplingConfig\.guidance_weight={shown} .*finite number >= 0"):
        SamplingConfig(guidance_weight=value)


@pytest.mark.parametrize("value, problem", [
    (2.7, "is not allowed"), (0, "is not allowed"), (-3, "is not allowed"),
    (NAN, "is not allowed"), (INF, "is not allowed"), ("3", r"is not a number \(str\)"),
    (True, r"is not a number \(bool\)"), (None, r"is not a number \(NoneType\)"),
])
def test_step_counts_must_be_whole_numbers(value, problem):
    # The case: 2.7 used to run 2 steps while the config still said 2.7.
    valid = r"; valid: a whole number >= 1"
    with pytest.raises(ConfigError,
                       match=rf"SamplingConfig\.num_steps={value!r} {problem}{valid}"):
        SamplingConfig(num_steps=value)


def test_whole_float_step_count_is_stored_as_int():
    # Decision: 3.0 means 3 steps; it is accepted and normalised, so configs report an int.
    for cfg_steps in (SamplingConfig(num_steps=3.0).num_steps,
                      SamplingConfig(num_steps=np.int64(3)).num_steps,
                      SamplingConfig().replace(num_steps=3.0).num_steps):
        assert cfg_steps == 3 and type(cfg_steps) is int


@pytest.mark.parametrize(
    "value, match",
    [(0.5, r"percentile=0\.5 looks like a quantile.*\[1, 100\]"),  # the case
     (101, r"percentile=101\.0 must lie in \(0, 100\]"),
     (NAN, r"percentile=nan must lie in \(0, 100\]"),
     (-INF, r"percentile=-inf must lie in \(0, 100\]")],
)
def test_percentile_is_refused_when_the_config_is_built(value, match):
    # percentile=0.5 used to pass SamplingConfig and fail only inside the sampler.
    with pytest.raises(ConfigError, match=r"SamplingConfig\." + match):
        SamplingConfig(percentile=value)


@pytest.mark.parametrize("value, shown", [(NAN, "nan"), (1.5, "1.5"), (-0.1, "-0.1"), (INF, "inf")])
def test_aug_level_must_be_finite_in_unit_interval(value, shown):
    with pytest.raises(ConfigError,
                       match=rf"SamplingConfig\.aug_level={shown} .*finite number in \[0, 1\]"):
        SamplingConfig(aug_level=value)
    with pytest.raises(ConfigError, match=r"Stage\.train_aug_max=.* must lie in \[0, 1\]"):
        Stage(model=tiny_sr(), resolution=16, lowres_resolution=8, train_aug_max=value)


def test_names_and_one_line_messages():
    with pytest.raises(ConfigError, match="sampler 'euler' unknown") as e:
        SamplingConfig(sampler="euler")
    _one_line(e.value)
    with pytest.raises(ConfigError, match="thresholding 'dyanmic' unknown"):
        SamplingConfig(thresholding="dyanmic")
    with pytest.raises(ConfigError, match=r"Stage\.min_snr_gamma=nan must be a finite number > 0"):
        Stage(model=tiny_base(), min_snr_gamma=NAN)
    with pytest.raises(ConfigError, match=r"Stage\.min_snr_offset=-1 must be a finite number >= 0"):
        Stage(model=tiny_base(), min_snr_offset=-1)
    with pytest.raises(ConfigError, match=r"Stage\.sampling=\{'num_steps': 3\} is not a "
                       "SamplingConfig"):
        Stage(model=tiny_base(), sampling={"num_steps": 3})


def _sr_stage(**sampling) -> Stage:
    return Stage(model=tiny_sr(), resolution=16, lowres_resolution=8, text_embed_dim=32,
                 sampling=SamplingConfig(**sampling), name="sr")


def test_with_sampling_validates_overrides_and_their_names():
    stage = _sr_stage()
    with pytest.raises(ConfigError, match=r"stage 'sr': guidance_weight=nan is not"):
        stage.with_sampling(guidance_weight=NAN)
    with pytest.raises(ConfigError, match=r"num_steps=2\.7 is not allowed"):
        stage.with_sampling(num_steps=2.7)
    with pytest.raises(ConfigError, match="guidance is not a sampler setting"):
        stage.with_sampling(guidance=3.0)
    assert stage.with_sampling(num_steps=4.0).sampling.num_steps == 4


def test_gin_sampling_overrides_are_validated_with_the_stage_named():
    gin_utils.register_all()
    cases = [
        ("SamplingConfig.guidance_weight = 1e999", r"stage 0: SamplingConfig\."
         r"guidance_weight=inf is not allowed; valid: a finite number >= 0"),
        ("stage1/SamplingConfig.num_steps = 2.7",
         r"stage 1: SamplingConfig\.num_steps=2\.7 is not allowed; valid: a whole number"),
        ("stage1/SamplingConfig.aug_level = -1e999",
         r"stage 1: SamplingConfig\.aug_level=-inf is not allowed"),
    ]
    for binding, match in cases:
        gin.clear_config()
        try:
            gin.parse_config(binding)
            with pytest.raises(ConfigError, match=match) as e:
                cascade.gin_sampling_overrides(2)
        finally:
            gin.clear_config()
        _one_line(e.value)
    gin.parse_config("SamplingConfig.num_steps = 3.0")
    try:
        assert cascade.gin_sampling_overrides(1) == [{"num_steps": 3}]
    finally:
        gin.clear_config()
    # A scope that names no stage would be ignored silently: refused instead.
    for scope in ("stage5", "tiny_sr"):
        gin.parse_config(f"{scope}/SamplingConfig.num_steps = 2")
        try:
            with pytest.raises(ConfigError, match=rf"scope '{scope}', which names no stage of "
                               r"this 2-stage cascade; use stage0/ \.\.\. stage1/") as e:
                cascade.gin_sampling_overrides(2)
        finally:
            gin.clear_config()
        _one_line(e.value)


def test_unparsable_gin_value_names_the_value_not_a_parser_object():
    with pytest.raises(gin_utils.GinConfigError, match=r"bad gin value 'nan': gin values are "
                       "Python literals") as e:
        gin_utils.parse(bindings=["stage0/SamplingConfig.guidance_weight = nan"], finalize=False)
    gin.clear_config()
    assert "object at 0x" not in str(e.value)
    _one_line(e.value)


def test_aug_level_above_the_trained_range_warns():
    with pytest.warns(UserWarning, match=r"stage 'sr' is sampled at aug_level=0\.8, above the "
                      r"range \[0, 0\.5\] it was trained with"):
        _sr_stage(aug_level=0.8).replace(train_aug_max=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sr_stage(aug_level=0.5).replace(train_aug_max=0.5)  # inside the range: silent
        _sr_stage(aug_level=0.8)  # the default range is [0, 1]
    # An override above the trained range warns too.
    stage = _sr_stage(aug_level=0.1).replace(train_aug_max=0.25, name="sr256")
    with pytest.warns(UserWarning, match=r"'sr256' is sampled at aug_level=0\.3, above the range "
                      r"\[0, 0\.25\]"):
        stage.with_sampling(aug_level=0.3)


# ------------------------------------------------------------------ 2. non-finite pixels


@pytest.fixture(scope="module")
def tiny_cascade():
    """base 8px -> SR 16px on ONE device (batch multiple 1: small programs, fast compiles)."""
    base = tiny_base(channels=8, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
                     text_embed_dim=EMBED_DIM, text_cond_dim=8, image_size=8, num_groups=4)
    sr = tiny_sr(blocks=((8, 1),), stem_channels=8, self_attention=(False,),
                 cross_attention=(False,), text_embed_dim=EMBED_DIM, text_cond_dim=8,
                 embed_dim=16, sinusoid_dim=8, num_groups=4)
    sampling = dict(sampler="ddim", num_steps=2, guidance_weight=1.0)
    stages = [
        Stage(model=base, resolution=8, sampling=SamplingConfig(**sampling),
              text_embed_dim=EMBED_DIM, name="base"),
        Stage(model=sr, resolution=16, lowres_resolution=8, sampling=SamplingConfig(**sampling),
              text_embed_dim=EMBED_DIM, name="sr"),
    ]
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    return cascade.Cascade(stages, params, embed_dim=EMBED_DIM, mesh=mesh)


def _embeds(n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, TEXT_LEN, EMBED_DIM)).astype(np.float32)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_lowres_with_one_non_finite_pixel_is_refused_naming_the_image(tiny_cascade, bad):
    # The case: one NaN pixel in float [-1, 1] input made every output pixel NaN (the
    # range check `min < -1.001 or max > 1.001` is False for NaN).
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    x[1, 3, 4, 0] = bad
    with pytest.raises(cascade.CascadeError,
                       match=r"low-resolution image 1 \(of 2\) holds 1 NaN/Inf value") as e:
        tiny_cascade.sample(text_embeds=_embeds(2), start=1, lowres=x)
    _one_line(e.value)


def test_non_finite_text_embeddings_are_refused(tiny_cascade):
    embeds = _embeds(3)
    embeds[2, 0, 5] = NAN
    with pytest.raises(cascade.CascadeError, match=r"text_embeds of prompt 2 \(of 3\) hold NaN"):
        tiny_cascade.sample(text_embeds=embeds)


def test_to_uint8_refuses_non_finite_values():
    x = np.zeros((3, 2, 2, 3), np.float32)
    x[2, 0, 0, 0] = NAN
    with pytest.raises(cascade.CascadeError, match=r"images \[2\] hold NaN/Inf"):
        cascade.to_uint8(x)


def _with_nan(params):
    """A diverged checkpoint: one NaN in the first kernel (on the parameters' devices)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    return jax.tree_util.tree_unflatten(tree, leaves)


def test_diverged_stage_stops_the_cascade_naming_the_stage(tiny_cascade):
    embeds = _embeds(2)
    clean = list(tiny_cascade.params)
    out = tiny_cascade.sample(text_embeds=embeds, seed=1)  # healthy parameters: no error
    assert all(np.isfinite(x).all() for x in out.float_images)
    try:
        # Parameters are arguments of the compiled program: swapping them reuses it.
        tiny_cascade.params[1] = _with_nan(clean[1])
        with pytest.raises(cascade.CascadeError, match=r"stage 1 \(sr\) produced NaN/Inf pixels "
                           r"in 2 of 2 images .*diverged") as e:
            tiny_cascade.sample(text_embeds=embeds, seed=1)
        _one_line(e.value)
        # A NaN base stage makes the SR stage NaN too: the first broken stage is named.
        tiny_cascade.params[0] = _with_nan(clean[0])
        with pytest.raises(cascade.CascadeError, match=r"stage 0 \(base\) produced NaN/Inf"):
            tiny_cascade.sample(text_embeds=embeds, seed=1)
    finally:
        tiny_cascade.params[:] = clean


def test_program_returns_per_image_finite_flags_without_host_round_trips(tiny_cascade):
    lowered = tiny_cascade.lower(2, text_length=TEXT_LEN)
    text = lowered.as_text()
    for op in ("callback", "infeed", "outfeed", "stablehlo.send", "stablehlo.recv"):
        assert op not in text
    shapes = [o.shape for o in jax.tree.leaves(lowered.out_info)]
    assert shapes == [(2, 8, 8, 3), (2, 16, 16, 3), (2,), (2,)]


def _float_tiff(path, value):
    """A float (PIL mode F) TIFF: PIL's RGB conversion turns its NaN into a black pixel."""
    pixels = np.full((8, 8), 100.0, np.float32)
    pixels[2, 5] = value
    Image.fromarray(pixels, mode="F").save(path)
    with Image.open(path) as im:  # the fault being guarded: NaN -> 0 (black), silently
        assert np.asarray(im.convert("RGB"))[2, 5, 0] in (0, 255)


def _color_features(images):
    x = images.astype(np.float64) / 255
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


@pytest.mark.parametrize("bad", [INF, NAN])
def test_fid_reference_image_with_inf_is_refused_naming_it(tmp_path, bad):
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(ref / "a.png")
    _float_tiff(str(ref / "b.tif"), bad)
    with pytest.raises(NonFiniteImageError,
                       match=r"reference image '.*b\.tif' holds 1 NaN/Inf pixel value") as e:
        fid.reference_stats(str(ref), _color_features, extractor_id="color",
                            cache_dir=str(tmp_path / "cache"), resolution=8, dim=6)
    _one_line(e.value)
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def _tiff_bytes(value):
    buf = io.BytesIO()
    pixels = np.full((40, 40), 50.0, np.float32)
    pixels[7, 9] = value
    Image.fromarray(pixels, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


class _StubSource:
    """The parts of ``TfdsSource`` that ``_PrepareExample`` uses (no tfds needed)."""

    class spec:  # noqa: N801 - mirrors the attribute of the real source
        name, split, image_feature = "stub_dataset", "train", "image"

    def example_id(self, example):
        return 7

    def caption(self, example):
        return "a caption"


@pytest.mark.parametrize("image", [
    _tiff_bytes(NAN),  # encoded bytes of a float TIFF
    np.full((40, 40, 3), INF, np.float32),  # a float array feature
], ids=["nan_tiff_bytes", "inf_array"])
def test_dataset_image_with_nan_is_refused_naming_the_example(image):
    with pytest.raises(NonFiniteImageError, match="holds .* NaN/Inf pixel value"):
        pipeline.decode_image(image)
    prepare = pipeline._PrepareExample(_StubSource(), pipeline.StageSpec(resolution=32),
                                       pipeline.TextSpec(mode="tokens"), None)
    with pytest.raises(pipeline.DataError, match=r"example id=7 \(record 3 of stub_dataset:train"
                       r"\): image feature 'image' holds .* NaN/Inf pixel value") as e:
        prepare({"image": image, "_record": 3}, np.random.default_rng(0))
    _one_line(e.value)
    skip = pipeline._PrepareExample(
        _StubSource(), pipeline.StageSpec(resolution=32, unreadable_images="skip"),
        pipeline.TextSpec(mode="tokens"), None)
    assert skip({"image": image, "_record": 3}, np.random.default_rng(0)) == {
        "_skipped": "unreadable"}


# ------------------------------------------------------------------ launchers


def _launch(module, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, prog, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


def test_launch_sample_refuses_inf_setting_and_nan_lowres_with_one_line(tmp_path):
    proc = _launch("launch.sample", f"--stages={tmp_path}/s0", "--prompts=a red circle",
                   f"--out={tmp_path}/out", "--gin.stage0/SamplingConfig.guidance_weight=1e999")
    _assert_one_line_error(proc, "launch.sample", "guidance_weight=inf", "finite number >= 0")
    _float_tiff(str(tmp_path / "low.tif"), NAN)
    proc = _launch("launch.sample", f"--stages={tmp_path}/s0", "--prompts=a red circle",
                   f"--out={tmp_path}/out", "--start=1", f"--lowres={tmp_path}/low.tif")
    _assert_one_line_error(proc, "launch.sample", "--lowres image", "low.tif",
                           "holds 1 NaN/Inf pixel value")
    assert not os.path.exists(tmp_path / "out")


def test_launch_evaluate_refuses_nan_settings_with_one_line(tmp_path):
    proc = _launch("launch.evaluate", "fid", "--sample_fn=not_loaded:factory", "--guidance=nan",
                   f"--out={tmp_path}/out")
    _assert_one_line_error(proc, "launch.evaluate", "--guidance=nan is not allowed",
                           "finite number >= 0")
    assert not os.path.exists(tmp_path / "out")


def _evaluate(*args):
    from launch import evaluate

    try:
        evaluate.main(evaluate.parse_flags(["evaluate", *args]))
    finally:
        evaluate.FLAGS.unparse_flags()


@pytest.mark.parametrize("flag, needle", [
    ("--num_steps=-3", "--num_steps=-3 is not allowed; valid: a whole number >= 1"),
    ("--guidance=1,inf", "--guidance=inf is not allowed"),
    ("--guidance=lots", "--guidance='lots' is not a number"),
    ("--sampler=euler", "--sampler 'euler' unknown"),
])
def test_evaluate_flag_variants_exit_with_one_line(tmp_path, flag, needle):
    with pytest.raises(SystemExit) as e:
        _evaluate("sweep", "--sample_fn=not_loaded:factory", flag, f"--out={tmp_path}")
    assert _one_line(e.value).startswith("launch.evaluate: ") and needle in str(e.value.code)


def never_sample_factory(guidance=None):
    def sample_fn(prompts, seed):
        raise AssertionError("the reference must be checked before any sampling")

    return sample_fn


def test_evaluate_fid_refuses_inf_reference_image_before_sampling(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    _float_tiff(str(ref / "bad.tif"), INF)
    extractor = mock.Mock(side_effect=lambda im: np.zeros((len(im), 2048)), fingerprint="fake")
    from launch import evaluate

    with mock.patch.object(evaluate, "make_inception", return_value=extractor):
        with pytest.raises(SystemExit) as e:
            _evaluate("fid", f"--sample_fn={__name__}:never_sample_factory",
                      "--inception_weights=unused.pth", f"--reference={ref}",
                      "--num_samples=2", "--batch_size=2", "--prompts=" + _prompts(tmp_path),
                      f"--out={tmp_path}/out")
    assert "reference image" in _one_line(e.value) and "bad.tif' holds 1 NaN/Inf" in str(
        e.value.code)


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ diverged checkpoint, CLI

BASE_CONFIG = "train.stage = @Stage()\n" + gin_model_bindings(tiny_base(
    channels=8, attn_resolutions=(4,), head_dim=8, num_groups=4, text_cond_dim=8, image_size=8,
)) + """Stage.resolution = 8
SamplingConfig.guidance_weight = 1.0
SamplingConfig.sampler = 'ddim'
SamplingConfig.num_steps = 2
Stage.text_length = 8
Stage.text_embed_dim = 32
Stage.text_fingerprint = '{fingerprint}'
"""


def _write_nan_checkpoint(workdir: str, config: str) -> None:
    """A trainer checkpoint whose EMA parameters hold a NaN (a diverged run)."""
    from imagen_jax.train.checkpoint import CheckpointConfig, Checkpointer
    from imagen_jax.train.state import TrainState, param_shapes

    gin_utils.register_all()
    gin.clear_config()
    gin.parse_config(config)
    try:
        stage = Stage()
    finally:
        gin.clear_config()
    params = jax.tree.map(jnp.asarray, cascade.random_params(stage, seed=0))
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, ema_params=_with_nan(params),
                       opt_state={}, rng=jax.random.PRNGKey(0),
                       bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
    ckpt = Checkpointer(workdir, CheckpointConfig(save_every=1, keep=1, keep_period=None,
                                                  async_save=False))
    ckpt.save(1, state, None, {"operative_config": config, "stage": stage.to_dict(),
                               "param_shapes": param_shapes(params)}, force=True)
    ckpt.close()


def test_launch_sample_on_diverged_checkpoint_writes_no_png(tmp_path):
    from absl import flags

    from imagen_jax.text import load_t5
    from imagen_jax.text.testing import write_random_t5
    from launch import sample as launcher

    t5 = write_random_t5(str(tmp_path / "t5"), texts=["a red circle"] * 4, vocab_size=64)
    fingerprint = load_t5(t5, max_length=8).fingerprint
    _write_nan_checkpoint(str(tmp_path / "base"), BASE_CONFIG.format(fingerprint=fingerprint))
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sample", f"--stages={tmp_path / 'base'}", f"--t5={t5}",
                 "--prompts=a red circle", f"--out={out}", "--noprogress"])
    try:
        with pytest.raises(SystemExit) as e:
            launcher.run([])
    finally:
        flags.FLAGS.unparse_flags()
    assert _one_line(e.value).startswith("launch.sample: stage 0 (base) produced NaN/Inf pixels")
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".png")]
