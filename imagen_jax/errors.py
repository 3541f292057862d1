"""The package's one error hierarchy.

Every error imagen-jax raises for bad input, configuration or state is an ``ImagenError``; its
message is one line naming the problem and the fix. The subclasses say where the problem lies,
whichever module detects it: a bad sampler setting is a ``ConfigError`` whether the trainer's
``Stage``, the cascade, gin or a launcher flag checks it. They also derive from the built-in
class a caller would expect (``ValueError``; ``RuntimeError`` for a run that cannot continue),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class ImagenError(Exception):
    """Base class of every error imagen-jax raises on purpose."""


class ConfigError(ImagenError, ValueError):
    """A setting, gin binding or stage record that cannot be used (raised before any compute)."""


class DataError(ImagenError, ValueError):
    """A dataset, image, caption, embedding cache or batch that cannot be used."""


class CheckpointError(ImagenError, ValueError):
    """A missing, incomplete, unreadable or mismatching checkpoint (T5 or trainer)."""


class CascadeError(ImagenError, ValueError):
    """A cascade that cannot be assembled or run (stage chain, inputs, sampling call)."""


class TrainingError(ImagenError, RuntimeError):
    """A training run that cannot continue (e.g. too many consecutive non-finite steps)."""
