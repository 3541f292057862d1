"""Orbax checkpointing of a training run: train state + data-iterator state + operative config.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`:
  state  the `TrainState` (sharded arrays; restorable onto any mesh),
  data   the data iterator's state, one JSON file per process (each host reads its own shard),
  meta   JSON: the operative gin config, the parameter shapes (the model's signature) and the
         process count.
Saves are asynchronous (device->host copy blocks, the write does not); orbax only ever exposes
complete checkpoints, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax.train.state import TrainState, param_shapes

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model being trained or sampled."""


# --------------------------------------------------------------------------- data iterator items


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (a JSON-able object or bytes) to one file per process.

    Works for grain's DataLoader/Dataset iterators and any iterator with `get_state`/`set_state`.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        state = args.item.get_state()
        if isinstance(state, bytes):
            payload = {"bytes": base64.b64encode(state).decode("ascii")}
        else:
            payload = {"json": state}
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path.write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> Any:
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise CheckpointMismatchError(
                f"no data-iterator state {path.name} in {directory} (found {found}): the "
                "checkpoint was written by a different number of processes; restart with the "
                "same process count or start the data pipeline fresh"
            )
        payload = json.loads(path.read_text())
        state = base64.b64decode(payload["bytes"]) if "bytes" in payload else payload["json"]
        args.item.set_state(state)
        return args.item

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def structure(self, directory: epath.Path) -> Any:  # older orbax interface
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


# --------------------------------------------------------------------------- manager


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep.

    Attributes:
      save_every: save every N steps (and always at the end and on SIGTERM).
      keep: keep the last K checkpoints ...
      keep_period: ... plus every checkpoint whose step is a multiple of M (None: none).
      async_save: write in a background thread (the device->host copy still blocks).
    """

    save_every: int = 5000
    keep: int = 3
    keep_period: int | None = 100_000
    async_save: bool = True

    def __post_init__(self):
        if self.save_every < 1 or self.keep < 1:
            raise ValueError(
                f"CheckpointConfig: save_every={self.save_every} and keep={self.keep} must be >= 1"
            )


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the run's three items."""

    def __init__(self, workdir: str, config: CheckpointConfig = CheckpointConfig(),
                 read_only: bool = False):
        self.config = config
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.save_every,
            max_to_keep=config.keep,
            keep_period=config.keep_period,
            enable_async_checkpointing=config.async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: DataIteratorHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any | None = None,
             meta: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Saves (if due, or `force`); returns whether a save started."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            items[DATA] = DataIteratorSave(data_iterator)
        items[META] = ocp.args.JsonSave(dict(meta or {}))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        return self.manager.restore(step, args=args)[META]

    def check_compatible(self, abstract_params: Any, step: int | None = None) -> None:
        """Raises `CheckpointMismatchError` if the saved parameters have other names or shapes."""
        saved = self.read_meta(step).get("param_shapes")
        if saved is None:
            return
        expected = param_shapes(abstract_params)
        if saved != expected:
            missing = sorted(set(expected) - set(saved))[:5]
            extra = sorted(set(saved) - set(expected))[:5]
            shape = [(k, saved[k], expected[k]) for k in sorted(set(saved) & set(expected))
                     if saved[k] != expected[k]][:5]
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (step {self._step(step)}) holds a different "
                f"model: parameters missing from it {missing}, unexpected {extra}, shape "
                f"mismatches (name, saved, expected) {shape}. Use a fresh --workdir for a new "
                "model, or the gin config the checkpoint was trained with."
            )

    def restore(self, abstract_state: TrainState, data_iterator: Any | None = None,
                step: int | None = None) -> TrainState:
        """Restores the state onto the shardings carried by `abstract_state` (any mesh)."""
        step = self._step(step)
        self.check_compatible(abstract_state.params, step)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and hasattr(data_iterator, "set_state"):
            items[DATA] = DataIteratorRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_params(self, abstract_params: Any, step: int | None = None,
                       which: str = "ema_params") -> Any:
        """Restores only `which` ('ema_params' or 'params'), e.g. for sampling."""
        if which not in ("ema_params", "params"):
            raise ValueError(f"which={which!r}; expected 'ema_params' or 'params'")
        step = self._step(step)
        self.check_compatible(abstract_params, step)
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype)
            if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(),
            abstract_params,
        )
        path = os.path.join(self.directory, str(step), STATE)
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item={which: abstract_params},
                    restore_args={which: restore_args},
                    partial_restore=True,
                ),
            )
        return restored[which]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step


def read_operative_config(workdir: str, step: int | None = None) -> str:
    """The gin config a checkpointed run was trained with."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.read_meta(step)["operative_config"]
    finally:
        ckpt.close()
