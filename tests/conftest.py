"""Test set-up: 8 simulated CPU devices so sharded code runs anywhere (must precede jax import)."""

import os

from tests.support import FAST_XLA  # noqa: E402  (standard library and numpy only)

# Cheap CPU compiles for every in-process test and every child that inherits the environment:
# the suite is dominated by compiling small programs, not running them. Measured on the 2-core
# box: 15% less CPU time over test_cascade, test_unet, test_diffusion_samplers, test_eval_sweep,
# test_t5_sharding, test_unet_train and test_train_checkpoint, all passing unchanged
# (bench/RESULTS.md). Children that time their runs (the learning guard) set their own flags.
_xla_flags = os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in _xla_flags:
    _xla_flags = f"{_xla_flags} {FAST_XLA}"
os.environ["XLA_FLAGS"] = _xla_flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# torchvision must be imported before TensorFlow (loaded by tfds dataset preparation): the other
# order segfaults with the wheels installed here. Tests import torch references lazily.
try:
    import torchvision  # noqa: F401, E402
except ImportError:  # the references are a test extra; tests that need them fail loudly
    pass

import pytest  # noqa: E402


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin made config._tmp_path_factory
def pytest_configure(config):
    """One persistent XLA compilation cache per test run, shared by both xdist workers and by
    every subprocess the tests start (they inherit the variable): programs that several tests
    compile alike (a resumed training run, the demo's second run, a launcher run twice) are
    compiled once. It lives in pytest's own temporary root, which pytest prunes. Set here, not at
    import time, because the temporary root is only known once pytest is configured; no test
    module (and so no jax import) has been collected yet. A variable set by the caller wins."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    basetemp = config._tmp_path_factory.getbasetemp()
    # xdist workers get <run root>/popen-gwN: the cache goes in the run root they share.
    root = basetemp.parent if hasattr(config, "workerinput") else basetemp
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "xla_cache")

# The longest modules (about a minute or more each on 2 cores), longest first. `make test` runs
# pytest-xdist with `--dist loadfile`: every module stays on one worker, so its module-scoped
# fixtures are built once, and a worker takes the next module when it is free. Starting the long
# ones first keeps one worker from finishing the run alone with a long module at the end
# (`--no-loadscope-reorder` keeps this order: by default xdist sorts modules by their number of
# tests, which puts these few-test modules last).
# (`--dist loadgroup` with xdist_group marks is not usable: with pytest 9 it silently groups
# nothing, because xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads.)
LONG_MODULES = (
    "test_demo",
    "test_documented_commands",
    "test_train_sharding",
    "test_train_resume",
    "test_device_check",
    "test_learning_race",
    "test_learning_regression",
    "test_train_behaviours",
    "test_checkpoint_incomplete",
    "test_train_checkpoint",
    "test_notebook",
    "test_cascade",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(autouse=True)
def _fresh_gin_and_flags():
    """Each test starts with no gin bindings and unparsed absl flags (launchers parse both)."""
    import gin
    from absl import flags

    gin.clear_config()
    yield
    gin.clear_config()
    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()


def pytest_terminal_summary(terminalreporter):
    """Prints which documented commands the suite ran and which are marked (see
    tests/test_documented_commands.py), from the reports' user properties (xdist-safe)."""
    lines = []
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name.startswith("documented_commands"):
                lines.append(f"-- {name}\n{value}")
    if lines:
        terminalreporter.write_sep("=", "documented commands (run / marked)")
        terminalreporter.write_line("\n".join(lines))


@pytest.fixture(scope="session")
def pipeline_data_dir(tmp_path_factory) -> str:
    """A tfds data_dir with the 32 px shapes (tests.support.SHAPES: 24 train / 8 heldout) and
    the pipeline edge-case builder, prepared once per session (per xdist worker) and shared by
    the pipeline, pipeline-resume and embedding-cache tests. Imported here, not at the top:
    tests.support_data loads TensorFlow Datasets."""
    from tests.support_data import prepare_pipeline_data

    return prepare_pipeline_data(str(tmp_path_factory.getbasetemp()))
