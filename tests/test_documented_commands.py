"""Every command the README and the gin file headers document is run here, or is marked.

A documented shell command is one of:
- marked: its line ends with ``# needs a pod``, ``# needs real weights`` or ``# needs a GPU``
  (it cannot run on a CPU box without downloads);
- ``make demo`` / ``make test``: ``make test`` is what CI runs, and ``tests/test_demo.py`` runs
  ``launch.demo`` (what ``make demo`` calls) on tiny settings;
- otherwise it is executed by ``test_quick_tour_runs_resumes_and_samples``, in an empty scratch
  working directory, in the order documented, against a ``pip install .`` copy of the package
  (not the checkout): the launchers and the shipped gin files work from any directory. Training
  commands get a shorter ``num_steps`` appended (compile time dominates on 2 cores); everything
  else runs exactly as written.

The README's Python blocks run as written, after the quick tour, in the same directory. The
list of run and marked commands is printed at the end of the pytest output.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags

from tests.support import FAST_XLA

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"#\s*needs (a pod|real weights|a GPU)\b")
# Appended to documented `launch.train` commands: a few steps, frequent checkpoints.
TRAIN_STEPS = 12
TRAIN_OVERRIDES = (f"--gin.TrainConfig.num_steps={TRAIN_STEPS}",
                   "--gin.CheckpointConfig.save_every=3", "--gin.CheckpointConfig.keep=2",
                   "--gin.TrainConfig.log_every=3")
COMMAND_TIMEOUT_S = 420


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block of a Markdown text."""
    return [(m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def _join_continuations(lines: list[str]) -> list[str]:
    """Shell lines -> commands: backslash continuations joined, comment-only lines dropped."""
    commands, current = [], ""
    for raw in lines:
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        commands.append((current + line).strip())
        current = ""
    if current:
        raise AssertionError(f"dangling line continuation in documented command: {current!r}")
    return commands


def readme_commands() -> list[str]:
    return [cmd for lang, body in _fenced_blocks(README.read_text())
            if lang in ("bash", "sh", "shell") for cmd in _join_continuations(body.splitlines())]


def readme_python_blocks() -> list[str]:
    return [body for lang, body in _fenced_blocks(README.read_text()) if lang == "python"]


def gin_header_commands() -> dict[str, list[str]]:
    """The run commands in each gin file's leading comment block (lines ``#   python ...``)."""
    out = {}
    for path in sorted((REPO / "gin_configs").rglob("*.gin")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        # A command starts with `#   python -m`; continuation lines follow a trailing backslash.
        body, continued = [], False
        for h in header:
            text = h[1:].strip()
            if continued or text.startswith("python -m"):
                body.append(text)
                continued = text.endswith("\\")
        if body:
            out[str(path.relative_to(REPO))] = _join_continuations(body)
    return out


def _strip_comment(cmd: str) -> str:
    return re.sub(r"\s+#.*$", "", cmd).strip()


def classify(cmd: str) -> str:
    if MARKER.search(cmd):
        return "marked: " + MARKER.search(cmd).group(0).lstrip("# ")
    if _strip_comment(cmd) in ("make demo", "make test"):
        return "covered: CI runs make test; tests/test_demo.py runs launch.demo on tiny settings"
    return "run"


def test_every_documented_command_is_run_or_marked(record_property):
    """Every command is parsed, classified, and each unmarked one is in the executed tour."""
    commands = readme_commands()
    assert any("launch.train" in c for c in commands), "README lost its training commands"
    headers = gin_header_commands()
    runnable = [_strip_comment(c) for c in commands + [c for v in headers.values() for c in v]
                if classify(c) == "run"]
    for name in ("base64.gin", "sr256.gin", "sr1024.gin", "tiny/base.gin", "tiny/sr.gin"):
        assert f"gin_configs/{name}" in headers, f"{name} header lost its run command"
    # Every runnable command is one the quick tour can execute: a module of this repository.
    for c in runnable:
        argv = shlex.split(c)
        assert argv[:2] == ["python", "-m"], f"unmarked documented command is not runnable: {c!r}"
    # Marked commands are not run, so at least their launcher and flags must exist.
    for c in commands + [c for v in headers.values() for c in v]:
        argv = [a for a in shlex.split(_strip_comment(c)) if a != "..."]
        if argv[:2] != ["python", "-m"] or not argv[2].startswith("launch."):
            continue
        importlib.import_module(argv[2])
        for arg in argv[3:]:
            name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
            if name and not name.startswith("gin."):
                assert name in flags.FLAGS, f"{c!r}: {argv[2]} has no flag --{name}"
    lines = [f"{classify(c).split(':')[0]:<7}  {where:<28}  {_strip_comment(c)[:100]}"
             for where, cmds in [("README.md", commands), *headers.items()] for c in cmds]
    record_property("documented_commands", "\n".join(lines))


def _env(site: Path | str = REPO) -> dict[str, str]:
    env = dict(os.environ)
    # `python` in the documented commands is the suite's interpreter (the .venv one).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(site)
    env["JAX_PLATFORMS"] = "cpu"
    # One CPU device, as a newcomer's laptop; XLA's cheap CPU compile (compiles dominate here).
    env["XLA_FLAGS"] = FAST_XLA
    return env


def install_copy(target: Path) -> Path:
    """``pip install --no-deps .`` of the checkout into ``target`` (the dependencies are the
    suite's own); returns ``target``. No network: the build uses the interpreter's setuptools."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return target


def _run(cmd: str, cwd: Path, site: Path | str = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(site), capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _complete_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _train_with_kill(cmd: str, cwd: Path, site: Path) -> None:
    """Start the documented training command, SIGKILL it once it has saved a checkpoint, then
    rerun the same command: it must resume (not restart) and finish."""
    workdir = cwd / re.search(r"--workdir=(\S+)", cmd).group(1)
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=_env(site),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    try:
        while not any(s >= 3 for s in _complete_steps(workdir)):
            assert proc.poll() is None, f"{cmd} ended before its first checkpoint:\n" + \
                proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, f"{cmd}: no checkpoint in {COMMAND_TIMEOUT_S} s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(_complete_steps(workdir))
    assert killed_at < TRAIN_STEPS, "the run finished before it could be killed"
    resumed = _run(cmd, cwd, site)
    assert "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert max(_complete_steps(workdir)) == TRAIN_STEPS
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == TRAIN_STEPS


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ten launcher runs, each compiling; about 5 minutes on a quiet CI box
def test_quick_tour_runs_resumes_and_samples(tmp_path, record_property):
    """The README's runnable commands, in order, from an empty directory against an installed
    copy of the package; the first training run is killed and resumed; then the gin headers'
    tiny commands and the README's Python blocks."""
    site = install_copy(tmp_path / "site")
    work = tmp_path / "work"
    work.mkdir()
    where = _run("python -c 'import imagen_jax, launch; print(imagen_jax.__file__, "
                 "launch.__file__)'", work, site).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where  # not the checkout
    ran = []
    trained_with_kill = False
    commands = [c for c in readme_commands() if classify(c) == "run"]
    headers = [c for cmds in gin_header_commands().values() for c in cmds
               if classify(c) == "run" and _strip_comment(c) not in map(_strip_comment, commands)]
    for cmd in commands + headers:
        cmd = _strip_comment(cmd)
        if " launch.train " in f" {cmd} ":
            cmd = f"{cmd} {' '.join(TRAIN_OVERRIDES)}"
            if not trained_with_kill:
                start = time.monotonic()
                _train_with_kill(cmd, work, site)
                trained_with_kill = True
                ran.append(f"{time.monotonic() - start:6.1f} s  {cmd}"
                           "   (killed after a checkpoint, rerun: resumed)")
                continue
        start = time.monotonic()
        _run(cmd, work, site)
        ran.append(f"{time.monotonic() - start:6.1f} s  {cmd}")
    assert trained_with_kill
    samples = sorted((work / "runs" / "samples").glob("*.png"))
    assert len(samples) >= 3, samples  # 2 images + the prompt's grid
    assert (work / "runs" / "drawbench" / "index.html").is_file()
    for block in readme_python_blocks():
        proc = subprocess.run([sys.executable, "-c", block], cwd=work, env=_env(site),
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"README Python block failed:\n{block}\n{proc.stderr[-4000:]}"
        ran.append("python block: " + block.strip().splitlines()[1][:90])
    record_property("documented_commands_run", "\n".join(ran))
