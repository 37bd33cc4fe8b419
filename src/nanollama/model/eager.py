"""`eager`: `torch.compiler.disable` without its import cost.

The decorator form of `torch.compiler.disable` imports torch._dynamo when the module that uses it is
imported: a second or two of every run's start-up, compiled or not. `eager` disables at call time, and
only when dynamo is tracing, so a run that never compiles never imports it.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager(fn: F) -> F:
    """Run `fn` eagerly (a graph break) inside a compiled region; a plain call outside one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
