r"""Trains one cascade stage from gin.

    python -m launch.train --gin_file=gin_configs/base64.gin --workdir=DIR \
        [--gin.NAME=VALUE ...] [--gin_search_paths=DIR ...]

Multi-host: pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or run
where `jax.distributed.initialize()` auto-detects the cluster, e.g. TPU pods, with
--distributed). Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags

from imagen_jax import gin_utils
from imagen_jax.errors import CheckpointError
from imagen_jax.train.trainer import ConfigError, TrainingError, train
from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_multi_string("gin_file", [], "Gin config files (searched in --gin_search_paths).")
sf.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files in.")
sf.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
sf.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
sf.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
sf.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
sf.DEFINE_integer("process_id", None, "This process's index (multi-host).")

def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; gin bindings are --gin.NAME=VALUE")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required (e.g. gin_configs/tiny/base.gin)")

    if FLAGS.coordinator_address or FLAGS.distributed:
        # Must precede any computation so every process sees the global device set.
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("imagen_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
    try:
        gin_utils.parse(FLAGS.gin_file, sf.GIN_BINDINGS, FLAGS.gin_search_paths)
    except gin_utils.GinConfigError as e:
        raise SystemExit(f"launch.train: {e}") from None

    try:
        train(FLAGS.workdir)
    except (ConfigError, CheckpointError, TrainingError) as e:
        # Configuration problems, unusable checkpoints or imported weights (TrainConfig.init_from)
        # and a diverged run (max_bad_steps) stop without a traceback: the message names the fix.
        # Its first line only: gin appends "In call to configurable".
        raise SystemExit(f"launch.train: {str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=sf.parse_flags)
