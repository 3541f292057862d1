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
