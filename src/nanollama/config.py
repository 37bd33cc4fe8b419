"""Typed configs: dataclass defaults < YAML file < `dotted.key=value` arguments.

Every config dataclass may define `check(self)`, raising `ConfigError(key, message)` with `key`
relative to itself; `validate` walks the tree and prefixes the full dotted path, so the user is
always told exactly which key is wrong. `check` is pure: it reads the config alone. Float keys must be
finite (`validate` refuses nan and inf before any `check`).

Start-up rule: everything a run will read (data, eval splits, tokenizer files, sizes that must divide by
the world size) is checked before the log dir exists, not at the first evaluation. A script's top-level
config may define `check_inputs(self)`, for checks that read files or data, span several sections or
need the world size; `load_config` calls it after `validate`, and its errors name full keys. Subclasses
(the eval configs) inherit it. A `FileError` names a file (and line) instead of a key, in any section.
`cli_main` turns any `ConfigError` into one line on stderr and exit code 2.

Presets: a file may begin with `defaults: [path, ...]`, files (themselves allowed `defaults:`) merged in
order before the file's own keys, then the CLI. Paths are relative to the file or the repository root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

# Top-level sections of a YAML file that are read by the launcher, not by the run itself.
LAUNCHER_SECTIONS = ("launcher", "grid")
DEFAULTS = "defaults"  # a config's list of preset files, merged before its own keys
ROOT = Path(__file__).resolve().parents[2]  # the repository: preset paths may be relative to it


class ConfigError(ValueError):
    """Bad input: names the offending key (or file) and says what is wrong, in one line."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


class FileError(ConfigError):
    """Bad input inside a file: names the file (`path` or `path:line`) rather than a key, in any section."""

    def __init__(self, path: str | os.PathLike, message: str):
        super().__init__(str(path), message)

    def prefixed(self, prefix: str) -> ConfigError:
        return self


@contextlib.contextmanager
def section(prefix: str) -> Iterator[None]:
    """Errors raised inside, keyed relative to the config section at `prefix`, come out with full keys."""
    try:
        yield
    except ConfigError as e:
        raise e.prefixed(prefix) from None


class RunError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): one line on stderr and exit code 1."""


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `config=PATH key=value ...` into the YAML path and the dotted overrides."""
    path, overrides = None, []
    for i, arg in enumerate(argv):
        if "=" not in arg:
            if i and "=" in argv[i - 1]:  # `key={a: 1}` unquoted, or through a shell variable
                raise ConfigError(
                    argv[i - 1].split("=", 1)[0],
                    f"its value seems split at a space ({argv[i - 1]!r} then {arg!r}): quote the whole "
                    """argument, or write it without spaces, e.g. 'optim.groups={"vision.":0.0}'""",
                )
            raise ConfigError(arg, "arguments must be key=value")
        key, value = arg.split("=", 1)
        if key == "config":
            path = value
        else:
            overrides.append(arg)
    return path, overrides


def read_utf8(path: str | os.PathLike) -> str:
    """The text of an input file; not UTF-8 is a ConfigError naming the file and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(path, f"not UTF-8 at byte {e.start}") from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in a mapping (PyYAML keeps the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing, empty, non-UTF-8 or malformed file, or a repeated key, is a
    ConfigError naming the file (and the line)."""
    if Path(path).is_dir():
        raise ConfigError("config", f"{path} is a directory, not a YAML file")
    if not Path(path).is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.load(read_utf8(path), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError("config", f"{path}: {e.message}") from None
    except _DuplicateKey as e:
        raise ConfigError("config", f"{path}:{e.line}: duplicate key {e.key!r}") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        raise ConfigError("config", f"{path} is empty (write {{}} to run on the defaults)")
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping at the top level")
    return data


# ----------------------------------------------------------------------------- presets (`defaults:`)


def config_layers(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(file, its own keys) of `path` and, before it, of every preset its `defaults: [path, ...]` pulls in
    (recursively, in merge order). A missing preset, a cycle or a malformed list names the file."""
    data = read_yaml(path)
    chain = (*_chain, Path(path).resolve())
    return preset_layers(data.pop(DEFAULTS, []), path, chain) + [(str(path), data)]


def preset_layers(entries: Any, origin: str | os.PathLike, chain: tuple[Path, ...] = ()) -> list:
    """The layers of a `defaults:` list written in `origin` (a file, or `grid.defaults` of one)."""
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise FileError(origin, f"{DEFAULTS}: must be a list of preset paths, got {entries!r}")
    layers = []
    for entry in entries:
        preset = find_preset(entry, origin)
        if preset in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(preset) :], preset))
            raise FileError(origin, f"{DEFAULTS}: cycle of presets ({cycle})")
        layers += config_layers(preset, chain)
    return layers


def find_preset(entry: str, origin: str | os.PathLike) -> Path:
    """A preset path: absolute, or relative to the file that names it, or to the repository root."""
    candidates = [Path(entry)] if Path(entry).is_absolute() else [Path(origin).parent / entry, ROOT / entry]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = " or ".join(str(c) for c in candidates)
    raise FileError(origin, f"{DEFAULTS}: preset {entry!r} not found ({tried})")


def merge_layers(layers: list[tuple[str, dict]]) -> dict:
    """Later layers win; lists are replaced, not concatenated."""
    if len(layers) < 2:
        return layers[0][1] if layers else {}
    return OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.create(data) for _, data in layers)))


def check_presets(cls: type, layers: list[tuple[str, dict]]) -> None:
    """An unknown key or a section given a value in a preset is named with the preset's file."""
    for path, data in layers:
        try:
            merge_config(cls, data)
        except ConfigError as e:
            raise FileError(path, str(e)) from None


def read_config(cls: type, path: str | os.PathLike) -> dict:
    """A config file with its presets merged in (checked against `cls`, each naming its own file)."""
    layers = config_layers(path)
    check_presets(cls, layers[:-1])
    return merge_layers(layers)


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
    schema, layers = OmegaConf.structured(cls), [data]
    try:
        layers.append(OmegaConf.from_dotlist(overrides or []))
        return OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as e:
        error = _omegaconf_error(e)
    for layer in layers if not error.key else ():  # OmegaConf names no key for `optim: 3`
        layer = layer if isinstance(layer, dict) else OmegaConf.to_container(layer)
        if found := _section_given_a_value(schema, layer):
            key, value = found
            error = ConfigError(key, f"is a section: expected a mapping of its keys, got {value!r}")
            break
    raise error


def _section_given_a_value(schema: DictConfig, data: dict, prefix: str = "") -> tuple[str, Any] | None:
    """The first (key, value) of `data` with a scalar or a list where `schema` has a section."""
    for key, value in data.items():
        sub = schema.get(key) if key in schema else None
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(sub, DictConfig):
            if not isinstance(value, dict):
                return full, value
            if found := _section_given_a_value(sub, value, full):
                return found
    return None


def load_config(cls: type[T], argv: list[str] | None = None) -> T:
    """The one entry for scripts: `config=PATH key=value ...` into a validated `cls`, whose
    `check_inputs()` (if it has one) has checked everything the run will read."""
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = build_config(cls, read_config(cls, path) if path else {}, overrides)
    if path and not any(o.startswith("orchestration.log_dir=") for o in overrides):
        follow_copied_run(cfg, Path(path))
    if hasattr(cfg, "check_inputs"):
        cfg.check_inputs()
    return cfg


def check_range(obj: Any, key: str, low: float | None = None, high: float | None = None) -> None:
    """`obj.<key>` within [low, high] (None: unbounded), else a ConfigError naming that very key."""
    value = getattr(obj, key)
    if low is not None and value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(key, f"must be <= {high}, got {value}")


def follow_copied_run(cfg: Any, path: Path) -> None:
    """`path` is a run's own `config.yaml` (beside its checkpoints or metrics) whose `log_dir` names
    another folder: the run was copied (`cp -r runs/a runs/b`). An evaluating config (one with a
    `checkpoint` key) reads the folder the file is in; a training one would act on the original, so it
    is refused, naming both folders, unless `orchestration.log_dir` is given."""
    orchestration = getattr(cfg, "orchestration", None)
    folder = path.parent
    if path.name != "config.yaml" or orchestration is None or not orchestration.log_dir:
        return
    if not ((folder / "checkpoints").is_dir() or (folder / "metrics").is_dir()):
        return
    if Path(orchestration.log_dir).resolve() == folder.resolve():
        return
    if "checkpoint" in {f.name for f in dataclasses.fields(cfg)}:
        orchestration.log_dir = str(folder)
        return
    raise ConfigError(
        "orchestration.log_dir",
        f"{path} is the config of the run in {folder}, but names log_dir {orchestration.log_dir} (a copied "
        f"run?): give orchestration.log_dir={folder} to go on in the copy, or ={orchestration.log_dir}",
    )


def validate(obj: Any, path: str = "") -> None:
    """Refuse non-finite floats, then call `check()` on every config dataclass of the tree, prefixing
    errors with their full key."""
    if dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f"{path}.{field.name}" if path else field.name
                raise ConfigError(key, f"must be a finite number, got {value}")
        if hasattr(obj, "check"):
            with section(path):
                obj.check()
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
    """Wrap a script's main: bad input is one line on stderr and exit code 2; a `RunError` or an OS error
    (full disk, read-only folder: the message names the path) one line and exit code 1; a closed pipe on
    stdout exit code 1 and nothing printed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a reader that closed the pipe (`| head`) shows here, not at exit
            return result
        except BrokenPipeError:  # quietly, as a shell tool does: nothing more can be printed anyway
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        except OSError as e:  # a full disk or read-only folder mid-run: the path and the OS error
            logging.getLogger(__name__).debug("OS error", exc_info=True)  # the traceback, in the run's log
            print(f"error: {e}", file=sys.stderr)
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
