"""Test set-up: 8 simulated CPU devices so sharded code runs anywhere (must precede jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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

# Modules whose tests mostly run subprocesses (launchers, several jax processes, kill/resume):
# one xdist group, so that two of them never compete for the 2 CI cores at once. Every other
# module is a group of its own, so module-scoped fixtures are built once per module.
SUBPROCESS_HEAVY = {
    "test_documented_commands",
    "test_multihost",
    "test_train_resume",
    "test_train_sharding",
    "test_sample_launcher",
    "test_pipeline_resume",
    "test_t5_encode_text",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        group = "subprocess" if module in SUBPROCESS_HEAVY else module
        item.add_marker(pytest.mark.xdist_group(group))


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
