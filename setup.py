"""imagen-jax: Imagen (Saharia et al. 2022) in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "gin-config>=0.5",
    "absl-py>=2.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "tensorstore>=0.1.60",
    "tqdm>=4.66",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "matplotlib>=3.8",
    "jinja2>=3.1",  # the HTML pages (demo report, DrawBench report, side-by-side rating)
    # Imported directly (also installed by jax / orbax, which may stop depending on them):
    "ml_dtypes>=0.4",  # bfloat16 tensors in checkpoints and caches
    "scipy>=1.11",  # connected components of the shapes scorer
    "etils[epath]>=1.5",  # orbax's path type, for gs:// work directories
    # The input pipeline: the trainer needs it, so a plain `pip install .` trains
    # (tests/test_packaging.py checks that every module-level import is listed here).
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "array-record>=0.7",
    "importlib_resources>=6.0",  # tfds needs it to prepare datasets but does not declare it
]
DATA: list[str] = []  # the old `data` extra, now part of CORE; kept so `.[data]` still installs
# Reference implementations the tests and benchmarks compare against. torch/torchvision are the
# builds that lie on this machine's disk (see /work/.library/env); imagen-pytorch, pytorch-fid
# need torchvision.
REFERENCES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=4.50",
    "diffusers>=0.30",
    "imagen-pytorch==2.1.0",
    "pytorch-fid>=0.3.0",
    "seqio>=0.0.19",
]
TEST = REFERENCES + [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "pytest-timeout>=2.3",  # per-test time limit, so one hung test cannot eat CI's 90 minutes
    "ruff>=0.6",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
]

setup(
    name="imagen-jax",
    version="0.1.0",
    description="Imagen cascaded text-to-image diffusion in JAX/Flax",
    python_requires=">=3.10",
    # imagen_jax/assets (the DrawBench prompts) and imagen_jax/eval/templates (the jinja2 HTML
    # pages) are data-only packages: listed explicitly, since find_packages skips folders without
    # __init__.py and setuptools warns about ambiguous data.
    # gin_configs/ ships inside the package as imagen_jax/gin_configs (also data-only), so an
    # installed launcher finds `--gin_file=base64.gin` by name from any directory.
    packages=find_packages(include=["imagen_jax", "imagen_jax.*", "launch"])
    + ["imagen_jax.assets", "imagen_jax.eval.templates", "imagen_jax.gin_configs"],
    package_dir={"imagen_jax.gin_configs": "gin_configs"},
    package_data={"imagen_jax.assets": ["*.csv", "*.md"],
                  "imagen_jax.eval.templates": ["*.j2"],
                  "imagen_jax.gin_configs": ["*.gin", "*/*.gin", "*/*/*.gin"],
                  # The pretrained demo cascade `make demo` samples first (launch/demo.py).
                  "launch": ["demo_cascade/*.json", "demo_cascade/*/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={"data": DATA, "test": TEST, "bench": REFERENCES},
)
