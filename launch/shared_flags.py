"""absl flag definitions shared by the launchers.

Each launcher is an absl app with its own flags, but tests (and notebooks) import several
launchers into one process, where absl refuses a second definition of a common flag such as
``--out`` or ``--t5``. These wrappers define a flag once and hand later launchers the existing
definition. Launchers that share a flag name give it the same type and default (use a default
of None and apply the launcher's own default in ``main``); a conflicting redefinition is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import flags

from imagen_jax.gin_utils import rewrite_flag_bindings


def _define_once(define: Callable[..., flags.FlagHolder]) -> Callable[..., flags.FlagHolder]:
    def wrapped(name: str, *args: Any, **kwargs: Any) -> flags.FlagHolder:
        if name in flags.FLAGS:
            existing = flags.FLAGS[name]
            default = args[0] if args else kwargs.get("default")
            parsed = existing.parser.parse(default) if isinstance(default, str) else default
            if (parsed or None) != (existing.default or None) and parsed != existing.default:
                raise ValueError(
                    f"flag --{name} is defined twice with different defaults "
                    f"({existing.default!r} vs {default!r}); give shared flags the default None "
                    "and apply each launcher's default in its main()"
                )
            return flags.FlagHolder(flags.FLAGS, existing)
        return define(name, *args, **kwargs)

    wrapped.__doc__ = define.__doc__
    return wrapped


DEFINE_string = _define_once(flags.DEFINE_string)
DEFINE_integer = _define_once(flags.DEFINE_integer)
DEFINE_float = _define_once(flags.DEFINE_float)
DEFINE_bool = _define_once(flags.DEFINE_bool)
DEFINE_enum = _define_once(flags.DEFINE_enum)
DEFINE_list = _define_once(flags.DEFINE_list)
DEFINE_multi_string = _define_once(flags.DEFINE_multi_string)
DEFINE_multi_integer = _define_once(flags.DEFINE_multi_integer)


def one_line_exit(prog: str, error: BaseException) -> SystemExit:
    """``SystemExit("prog: message")`` with the message folded onto ONE line.

    Raise it ``from None`` for bad user input: Python prints the message to stderr and exits
    with status 1, with no traceback (gin's and other multi-line messages are joined).
    """
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return SystemExit(f"{prog}: {text or type(error).__name__}")


# The `--gin.NAME=VALUE` bindings of the launcher this process runs (t5x style), filled by
# `parse_flags`; a launcher hands them to gin after its own flags are known.
GIN_BINDINGS: list[str] = []


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for ``app.run(main, flags_parser=parse_flags)``: takes the
    ``--gin.NAME=VALUE`` arguments out of ``argv`` into `GIN_BINDINGS`, parses the rest as absl
    flags and returns the remaining positional arguments."""

    rest, bindings = rewrite_flag_bindings(argv)
    GIN_BINDINGS[:] = bindings
    return flags.FLAGS(rest)
