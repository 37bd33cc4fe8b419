"""The line the Monitor logs at every start of a run: which app's entrypoint it is and when it started.

`python -m src.nanollama.runs` reads it back from `logs/` to tell a run's app and age from its files alone.
"""

from __future__ import annotations

import re
import sys
import time

from ..app import RunConfig

# The Monitor logs this at every start: the module to rebuild the run's default config from, and when.
START = "run start: script {script}, at {time}"
START_RE = re.compile(r"run start: script (\S*), at (\S+)")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


def script_module(run_config: RunConfig) -> str:
    """The module that defines the run's config class: the app's entrypoint (`python -m` makes it
    `__main__`, whose spec still has the real name)."""
    module = type(run_config).__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else ""
    return module


def start_line(run_config: RunConfig) -> str:
    return START.format(script=script_module(run_config) or "?", time=time.strftime(TIME_FORMAT))
