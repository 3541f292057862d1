"""Orbax checkpointing of a training run: train state + data-iterator state + operative config.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`:
  state  the `TrainState` (sharded arrays; restorable onto any mesh),
  data   the data iterator's state, one JSON file per process (each host reads its own shard),
  meta   JSON: the operative gin config, the parameter shapes (the model's signature) and the
         process count.
Saves are asynchronous (device->host copy blocks, the write does not).

Incomplete steps. Orbax writes a local step into `<step>.orbax-checkpoint-tmp...` and renames it
when done, but a step directory can still be left incomplete: by a copy (`cp -r`, `gsutil cp`)
that was interrupted, a full disk, a save to an object store (which writes in place) that was
preempted, or a hand-made directory. `step_problem` is the one place that decides whether a step
is complete; `Checkpointer` lists, restores and resumes only complete steps, with a warning naming
each incomplete one. A writable `Checkpointer` (the trainer's) renames an incomplete step to
`<step>.incomplete` (kept for inspection, never deleted) so orbax can save that step again, and
deletes only orbax's own temporary directories. A complete-looking step whose arrays cannot be
read (truncated files) is skipped the same way once an older step restores into the same state.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax.errors import CheckpointError
from imagen_jax.train.state import TrainState, param_shapes

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that does not fit the model being trained or sampled."""


class IncompleteCheckpointError(CheckpointMismatchError):
    """A checkpoint step that is incomplete or cannot be read (interrupted save or copy).

    A `CheckpointMismatchError` so the launchers' one-line error handling covers it.
    """


# --------------------------------------------------------------------------- complete steps

# Orbax's marker for a directory it is still writing (`15.orbax-checkpoint-tmp`, older versions
# append `-<timestamp>`); orbax deletes such a directory itself before reusing its name.
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Orbax's step-level metadata: written when a save starts, `commit_timestamp_nsecs` is filled in
# only when it is finalised (orbax >= 0.11, local and object stores alike).
STEP_METADATA = "_CHECKPOINT_METADATA"
INCOMPLETE_SUFFIX = ".incomplete"
_STEP_NAME = re.compile(r"^(0|[1-9][0-9]*)$")
_ORBAX_TMP_NAME = re.compile(r"^(0|[1-9][0-9]*)" + re.escape(ORBAX_TMP_SUFFIX) + r"(-[0-9]+)?$")
_DATA_FILE = re.compile(r"^process_([0-9]+)-of-([0-9]+)\.json$")


def _read_json(path: epath.Path) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, why it cannot be used)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path.parent.name}/{path.name} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{path.parent.name}/{path.name} is unreadable ({type(e).__name__})"


def _state_problem(item: epath.Path) -> str | None:
    """The pytree item: its metadata files parse and, for OCDBT, the root manifest exists."""
    tree, why = _read_json(item / "_METADATA")
    if why:
        return why
    if not isinstance(tree, dict) or "tree_metadata" not in tree:
        return f"{item.name}/_METADATA holds no tree metadata"
    for path in [item / "_sharding", *sorted((item / "array_metadatas").glob("*"))]:
        if path.exists():
            _, why = _read_json(path)
            if why:
                return why
    manifest = item / "manifest.ocdbt"
    if tree.get("use_ocdbt") and (not manifest.exists() or manifest.stat().length == 0):
        return f"{item.name}/manifest.ocdbt is missing or empty"
    return None


def _data_problem(item: epath.Path) -> str | None:
    """The data-iterator item: one parseable JSON file for each of the saving processes."""
    found = {}
    for path in item.glob("process_*"):
        match = _DATA_FILE.match(path.name)
        if match:
            found[path.name] = (int(match.group(1)), int(match.group(2)))
    counts = {n for _, n in found.values()}
    if len(counts) != 1:
        return f"{item.name}/ holds no consistent process_*-of-N.json files ({sorted(found)})"
    count = counts.pop()
    for index in range(count):
        payload, why = _read_json(item / f"process_{index}-of-{count}.json")
        if why:
            return why
        if not isinstance(payload, dict) or not ({"json", "bytes"} & set(payload)):
            return f"{item.name}/process_{index}-of-{count}.json holds no iterator state"
    return None


def step_problem(step_dir: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint step in ``step_dir`` is incomplete, or None when it is complete.

    Complete means: orbax finalised the save (``_CHECKPOINT_METADATA`` parses and has a commit
    timestamp), every item it lists (always ``state`` and ``meta``) is a directory, and each
    item's own metadata files are present and parse (the pytree ``_METADATA``, ``_sharding``,
    array metadata and OCDBT manifest; the JSON ``meta``; one data-iterator file per process).
    Array data files are not read here (that would read the whole checkpoint): a truncated one
    shows at restore, where `Checkpointer` falls back to an older step.

    Returns a short reason (e.g. "item 'state' is missing"), for messages.
    """
    path = epath.Path(step_dir)
    if not path.is_dir():
        return "not a directory"
    if not any(True for _ in path.iterdir()):
        return "the directory is empty"
    meta, why = _read_json(path / STEP_METADATA)
    if why:
        return f"{why}: the save was never finalised"
    if not isinstance(meta, dict) or meta.get("commit_timestamp_nsecs") is None:
        return f"{STEP_METADATA} has no commit timestamp: the save was never finalised"
    handlers = meta.get("item_handlers")
    items = set(handlers) if isinstance(handlers, dict) else set()
    for name in sorted(items | {STATE, META}):
        if not (path / name).is_dir():
            return f"item {name!r} is missing"
    checks = {STATE: _state_problem, META: lambda item: _read_json(item / "metadata")[1],
              DATA: _data_problem}
    for name in sorted(items | {STATE, META}):
        problem = checks[name](path / name) if name in checks else None
        if problem:
            return problem
    return None


@dataclasses.dataclass(frozen=True)
class StepScan:
    """The step directories of a checkpoint directory, sorted by step."""

    complete: list[int]
    incomplete: dict[int, str]  # step -> reason (`step_problem`)
    orbax_tmp: list[str]  # names of orbax's own temporary directories


def scan_steps(directory: str | os.PathLike[str]) -> StepScan:
    """Classifies every entry of a `checkpoint_dir` (other names are ignored)."""
    root = epath.Path(directory)
    complete, incomplete, tmp = [], {}, []
    if root.exists():
        for path in root.iterdir():
            if _STEP_NAME.match(path.name):
                problem = step_problem(path)
                if problem:
                    incomplete[int(path.name)] = problem
                else:
                    complete.append(int(path.name))
            elif _ORBAX_TMP_NAME.match(path.name) and path.is_dir():
                tmp.append(path.name)
    return StepScan(sorted(complete), dict(sorted(incomplete.items())), sorted(tmp))


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    text = text.split(" See full TensorStore details")[0]  # a repr of the whole store follows
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    """``workdir/checkpoints``, absolute (orbax refuses relative local paths); URLs such as
    ``gs://bucket/run`` are kept as they are."""
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    return os.path.join(workdir, "checkpoints")


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the run's three items.

    It only picks complete steps (`step_problem`), warning once about each incomplete one.
    Writable (the trainer's): on opening it renames incomplete steps to `<step>.incomplete` and
    deletes orbax's leftover temporary directories (process 0; all processes then sync).
    `restore`/`restore_params` without a step fall back from a step that cannot be read to the
    previous complete one; `restored_step` says which step was used.
    """

    def __init__(self, workdir: str, config: CheckpointConfig = CheckpointConfig(),
                 read_only: bool = False):
        self.config = config
        self.read_only = read_only
        self.directory = checkpoint_dir(workdir)
        self.restored_step: int | None = None
        self._warned: set[int] = set()
        if not read_only:
            self._set_aside_incomplete()
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
        """The newest complete step, or None. Writable: includes a save still being written."""
        if not self.read_only:
            return self.manager.latest_step()
        root = epath.Path(self.directory)
        names = [p.name for p in root.iterdir()] if root.exists() else []
        for step in sorted((int(n) for n in names if _STEP_NAME.match(n)), reverse=True):
            problem = step_problem(root / str(step))
            if problem is None:
                return step
            self._warn_incomplete(step, problem)
        return None

    def all_steps(self) -> list[int]:
        """The complete steps, oldest first."""
        if not self.read_only:
            return list(self.manager.all_steps())
        scan = scan_steps(self.directory)
        for step, problem in scan.incomplete.items():
            self._warn_incomplete(step, problem)
        return scan.complete

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
        """Restores the state onto the shardings carried by `abstract_state` (any mesh).

        ``step=None``: the newest complete step that can be read (see `restored_step`).
        Raises `CheckpointMismatchError` for another model, `IncompleteCheckpointError` when the
        step (or, with ``step=None``, every complete step) cannot be read, `FileNotFoundError`
        when there is no complete step.
        """
        def attempt(s: int) -> TrainState:
            self.check_compatible(abstract_state.params, s)
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None and hasattr(data_iterator, "set_state"):
                items[DATA] = DataIteratorRestore(data_iterator)
            return self.manager.restore(s, args=ocp.args.Composite(**items))[STATE]

        return self._restore_newest(attempt, step)

    def restore_params(self, abstract_params: Any, step: int | None = None,
                       which: str = "ema_params") -> Any:
        """Restores only `which` ('ema_params' or 'params'), e.g. for sampling."""
        if which not in ("ema_params", "params"):
            raise ValueError(f"which={which!r}; expected 'ema_params' or 'params'")
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype)
            if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(),
            abstract_params,
        )

        def attempt(s: int) -> Any:
            self.check_compatible(abstract_params, s)
            path = os.path.join(self.directory, str(s), STATE)
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

        return self._restore_newest(attempt, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return step
        if self.read_only or step not in self.manager.all_steps():
            problem = step_problem(os.path.join(self.directory, str(step)))
            if problem:
                raise IncompleteCheckpointError(
                    f"checkpoint step {step} in {self.directory} is incomplete ({problem}); "
                    f"use a complete step ({self._complete_steps_text()}) or copy it again"
                )
        return step

    def _restore_newest(self, attempt: Any, step: int | None) -> Any:
        """``attempt(step)`` for the given step, or from the newest complete step down.

        A step that fails to restore while an older one restores into the same target has
        damaged files (e.g. a truncated array): it is skipped with a warning and, when writable,
        set aside like an incomplete step. If every step fails, the newest one's error is raised:
        then the cause is more likely a changed configuration than damage.
        """
        if step is not None:
            step = self._step(step)
            try:
                result = attempt(step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                raise IncompleteCheckpointError(
                    f"checkpoint step {step} in {self.directory} cannot be restored "
                    f"({_first_line(e)}); its files are damaged (interrupted copy, full disk) "
                    f"or it holds another configuration: use another step "
                    f"({self._complete_steps_text()}) or copy it again"
                ) from e
            self.restored_step = step
            return result
        candidates = self.all_steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        failures: list[tuple[int, Exception]] = []
        for s in candidates:
            try:
                result = attempt(s)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                failures.append((s, e))
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying the "
                            "previous complete step", s, self.directory, _first_line(e))
                continue
            for bad, e in failures:
                self._set_aside(bad, f"its files cannot be read: {_first_line(e)}",
                                f"restored step {s}")
            if failures:
                self._sync_after_set_aside("unreadable")
            self.restored_step = s
            return result
        newest, error = failures[0]
        raise IncompleteCheckpointError(
            f"no checkpoint step in {self.directory} can be restored into this state; step "
            f"{newest}: {_first_line(error)}. If the model, optimizer or mesh config changed, "
            "use the config it was trained with or a fresh --workdir; if the files are damaged, "
            "copy them again"
        ) from error

    def _complete_steps_text(self) -> str:
        steps = self.all_steps()
        return f"complete steps: {steps}" if steps else "there is none"

    def _warn_incomplete(self, step: int, problem: str) -> None:
        if step not in self._warned:
            self._warned.add(step)
            log.warning("checkpoint step %d in %s is incomplete (%s); using the newest complete "
                        "step instead", step, self.directory, problem)

    def _set_aside_incomplete(self) -> None:
        """Opening for writing: incomplete steps -> `<step>.incomplete`; orbax temp dirs deleted.

        Orbax would otherwise count an incomplete step as saved (its listing only checks the
        name) and refuse, or delete, that step's next save.
        """
        if jax.process_index() == 0:
            root = epath.Path(self.directory)
            scan = scan_steps(root)
            for name in scan.orbax_tmp:
                # Orbax's own unfinished save (it deletes these itself before reusing a name):
                # removed so a full disk does not stay full.
                log.warning("deleting %s: an unfinished orbax save", root / name)
                (root / name).rmtree()
            latest = scan.complete[-1] if scan.complete else None
            resume = f"resuming from step {latest}" if latest is not None else "starting afresh"
            for step, problem in scan.incomplete.items():
                self._set_aside(step, problem, resume)
        self._sync_after_set_aside("incomplete")

    def _set_aside(self, step: int, problem: str, action: str) -> None:
        """Renames a bad step directory (writable, process 0), never deleting it."""
        self._warned.add(step)
        if self.read_only:
            return
        if jax.process_index() == 0:
            root = epath.Path(self.directory)
            target, k = root / f"{step}{INCOMPLETE_SUFFIX}", 1
            while target.exists():
                k += 1
                target = root / f"{step}{INCOMPLETE_SUFFIX}-{k}"
            (root / str(step)).rename(target)
            log.warning("checkpoint step %d in %s is incomplete (%s); moved it to %s (delete it "
                        "once inspected); %s", step, self.directory, problem, target.name, action)

    def _sync_after_set_aside(self, what: str) -> None:
        if self.read_only:
            return
        if jax.process_count() > 1:

            multihost_utils.sync_global_devices(f"imagen_jax checkpoint: {what} steps set aside")
        if hasattr(self, "manager"):
            self.manager.reload()


def read_operative_config(workdir: str, step: int | None = None) -> str:
    """The gin config a checkpointed run was trained with."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.read_meta(step)["operative_config"]
    finally:
        ckpt.close()
