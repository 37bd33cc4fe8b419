"""Typed configs: dataclass defaults < YAML file < `dotted.key=value` arguments.

Every config dataclass may define `check(self)`, raising `ConfigError(key, message)` with `key`
relative to itself; `validate` walks the tree and prefixes the full dotted path, so the user is
always told exactly which key is wrong. `cli_main` turns any `ConfigError` into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

# Top-level sections of a YAML file that are read by the launcher, not by the run itself.
LAUNCHER_SECTIONS = ("launcher", "grid")


class ConfigError(ValueError):
    """Bad input: names the offending key (or file) and says what is wrong, in one line."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


class RunError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): one line on stderr and exit code 1."""


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `config=PATH key=value ...` into the YAML path and the dotted overrides."""
    path, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(arg, "arguments must be key=value")
        key, value = arg.split("=", 1)
        if key == "config":
            path = value
        else:
            overrides.append(arg)
    return path, overrides


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, turning missing or malformed files into a ConfigError naming the file."""
    if not Path(path).is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping at the top level")
    return data


def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", "") or ""
    if isinstance(e, ConfigKeyError):
        where = getattr(getattr(e, "object_type", None), "__name__", "")
        return ConfigError(key, f"unknown key (not a field of {where})" if where else "unknown key")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ValidationError):
        return ConfigError(key, f"bad value ({first})")
    return ConfigError(key, first)


def build_config(cls: type[T], data: dict | None = None, overrides: list[str] | None = None) -> T:
    """Merge defaults < `data` < `overrides` into a validated instance of the dataclass `cls`."""
    merged = merge_config(cls, data, overrides)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(cfg)
    return cfg


def merge_config(cls: type, data: dict | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults < `data` < `overrides`, typed by `cls` but not yet validated (to inspect its keys)."""
    data = {k: v for k, v in (data or {}).items() if k not in LAUNCHER_SECTIONS}
    try:
        return OmegaConf.merge(OmegaConf.structured(cls), data, OmegaConf.from_dotlist(overrides or []))
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None


def load_config(cls: type[T], argv: list[str] | None = None) -> T:
    """The one entry for scripts: `config=PATH key=value ...` into a validated `cls`."""
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    return build_config(cls, read_yaml(path) if path else {}, overrides)


def validate(obj: Any, path: str = "") -> None:
    """Call `check()` on every config dataclass of the tree, prefixing errors with their full key."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "check"):
            try:
                obj.check()
            except ConfigError as e:
                raise e.prefixed(path) from None
        for field in dataclasses.fields(obj):
            validate(getattr(obj, field.name), f"{path}.{field.name}" if path else field.name)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            validate(item, f"{path}.{i}")


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's main: bad input is one line on stderr and exit code 2, a `RunError` exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def entrypoint(cls: type[T], run: Callable[[T], Any]) -> Callable[..., Any]:
    """An app script's `main(argv=None)`: `run(load_config(cls, argv))` with `cli_main`'s exit codes.
    `main.config_class` tells the launcher which dataclass checks the script's task configs."""

    @cli_main
    def main(argv: list[str] | None = None) -> Any:
        return run(load_config(cls, argv))

    main.config_class = cls
    return main
