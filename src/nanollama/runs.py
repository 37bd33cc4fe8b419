"""The runs under a folder, any app, sweeps included: what each is, how far it got and how it ended.

    python -m src.nanollama.runs list [ROOT] [--sort date|step|loss] [--limit N]
    python -m src.nanollama.runs show PATH

A run folder holds `config.yaml` and `metrics/` or `checkpoints/` (the log-dir layout). Everything is
read from its files, so any run, live or dead, anywhere, is listed the same way:

    app       the entrypoint module, from the `run start:` line the Monitor logs at every start
              (a sweep's `sweep.yaml` for older runs)
    step      the last raw metric line's step, over `optim.steps`
    state     running: another process holds the log dir's lock; done: step == optim.steps; preempted:
              the last start ended on a signal (its log, or the sweep task's status says so); failed: the rest
    started   the time of the first start
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .config import ConfigError, cli_main, read_yaml, to_dict
from .monitor.checkpoint import CONFIRMED, EVAL_FLAG, list_checkpoints
from .monitor.lock import LOCK_FILE
from .monitor.logger import read_jsonl
from .monitor.run_config import flatten
from .monitor.run_start import START_RE, TIME_FORMAT

# Lines of a start that ended on a signal (preemption.py, Monitor.end_step), or on an error (Monitor).
PREEMPTED_RE = re.compile(r"preempted: checkpoint saved|received SIG\w+: checkpointing")
FAILED_RE = re.compile(r"run stopped at step")
SKIP_DIRS = {"code", "wandb", "logs", "tasks", "submitit", "metrics", "checkpoints", "profiler"}
SORTS = ("date", "step", "loss")


@dataclass
class Run:
    path: Path
    name: str
    script: str
    step: int
    total: int
    loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    state: str = "failed"
    started: float | None = None  # seconds since the epoch

    @property
    def app(self) -> str:
        """`src.apps.gssm.train` -> `gssm`."""
        parts = self.script.split(".")
        return parts[-2] if len(parts) >= 2 else self.script or "?"


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (
        (path / "metrics").is_dir() or (path / "checkpoints").is_dir()
    )


def find_runs(root: Path) -> list[Path]:
    """Run folders under `root` (itself included), sweeps' runs too; never inside a run folder."""
    found = []
    for folder, subdirs, _ in os.walk(root):
        path = Path(folder)
        if is_run(path):
            found.append(path)
            subdirs.clear()
        else:
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.startswith("."))
    return found


def lock_held(log_dir: Path) -> bool:
    """Whether a live process holds the run's lock (lock.py's lockf). On Linux `/proc/locks` says so
    without opening the file: closing a descriptor of it would drop a lock this process itself holds.
    Otherwise (or for a holder on another NFS client), a shared-lock probe on a read-only descriptor."""
    path = log_dir / LOCK_FILE
    try:
        st = path.stat()
    except OSError:
        return False
    if _listed_in_proc_locks(st):
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return False


def _listed_in_proc_locks(st: os.stat_result) -> bool:
    """Lines read `1: POSIX  ADVISORY  WRITE PID MAJ:MIN:INODE START END` (device numbers in hex)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return False
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(
        len(f := line.split()) > 5 and f[1] == "POSIX" and f[5] == device for line in text.splitlines()
    )


def _starts(log_dir: Path) -> tuple[list[tuple[str, str]], str]:
    """(script, time) of every start in rank 0's log, and the log's text since the last one."""
    log = log_dir / "logs" / "rank_0.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    matches = list(START_RE.finditer(text))
    return [m.groups() for m in matches], text[matches[-1].end() :] if matches else text


def _sweep_task(log_dir: Path) -> tuple[dict, str]:
    """A sweep task's run (`{sweep}/runs/{i}`): the sweep record and the task's status state, else {}."""
    sweep = log_dir.parent.parent
    if log_dir.parent.name != "runs" or not (sweep / "sweep.yaml").is_file():
        return {}, ""
    try:
        record = yaml.safe_load((sweep / "sweep.yaml").read_text()) or {}
    except yaml.YAMLError:
        record = {}
    state = ""
    status = sweep / "tasks" / f"{log_dir.name}.status"
    if status.is_file():
        state = (_parse_status(status.read_text()) or {}).get("state", "")
    return record if isinstance(record, dict) else {}, state


def _parse_status(text: str) -> dict | None:
    try:
        record = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError:
        return None
    return record if isinstance(record, dict) else None


def _last(path: Path) -> dict:
    return (read_jsonl(path) or [{}])[-1] if path.is_file() else {}


def read_run(log_dir: Path) -> Run:
    config = read_yaml(log_dir / "config.yaml")
    orchestration, optim = config.get("orchestration") or {}, config.get("optim") or {}
    starts, since_last = _starts(log_dir)
    sweep, task_state = _sweep_task(log_dir)
    script = starts[-1][0] if starts else ""
    script = script if script not in ("", "?") else str(sweep.get("script", "") or "")
    raw = _last(log_dir / "metrics" / "raw_0.jsonl")
    last_eval = _last(log_dir / "metrics" / "eval_0.jsonl")
    checkpoints = list_checkpoints(log_dir / "checkpoints")
    step = int(raw.get("step", int(checkpoints[-1].name) if checkpoints else 0))
    total = int(optim.get("steps", 0) or 0)
    evals = {k: v for k, v in last_eval.items() if k != "step" and isinstance(v, (int, float))}
    if lock_held(log_dir):
        state = "running"
    elif total and step >= total and not FAILED_RE.search(since_last):  # a run can die on its last step
        state = "done"
    elif task_state in ("stopped", "requeued") or PREEMPTED_RE.search(since_last):
        state = "preempted"
    else:
        state = "failed"
    started = None
    if starts:
        try:
            started = time.mktime(time.strptime(starts[0][1], TIME_FORMAT))
        except ValueError:
            started = None
    if started is None:
        started = (log_dir / "config.yaml").stat().st_mtime
    loss = raw.get("loss")
    return Run(
        path=log_dir,
        name=str(orchestration.get("name", log_dir.name)),
        script=script,
        step=step,
        total=total,
        loss=float(loss) if isinstance(loss, (int, float)) else None,
        eval=evals,
        state=state,
        started=started,
    )


def sort_runs(runs: list[Run], by: str) -> list[Run]:
    """date: newest first; step: furthest first; loss: lowest first (runs without a finite one last)."""
    if by == "date":
        return sorted(runs, key=lambda r: -(r.started or 0))
    if by == "step":
        return sorted(runs, key=lambda r: (-r.step, r.name))
    finite = [r.loss is not None and math.isfinite(r.loss) for r in runs]
    order = sorted(zip(finite, runs), key=lambda p: (not p[0], p[1].loss if p[0] else 0.0, p[1].name))
    return [r for _, r in order]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _eval_text(evals: dict[str, float], limit: int = 3) -> str:
    return " ".join(f"{k}={_num(v)}" for k, v in list(evals.items())[:limit]) or "-"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_table(runs: list[Run]) -> str:
    header = ("name", "app", "step", "loss", "eval", "state", "started", "path")
    rows = [
        (
            r.name,
            r.app,
            f"{r.step}/{r.total}",
            _num(r.loss),
            _eval_text(r.eval),
            r.state,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)) if r.started else "-",
            _relative(r.path),
        )
        for r in runs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def list_runs(root: str | os.PathLike, sort: str = "date", limit: int = 0) -> list[Run]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("ROOT", f"{root} is not a folder")
    if sort not in SORTS:
        raise ConfigError("--sort", f"{sort!r} is not one of {', '.join(SORTS)}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0 (0: all), got {limit}")
    runs = []
    for path in find_runs(root):
        try:
            runs.append(read_run(path))
        except ConfigError as e:  # one unreadable config.yaml must not hide the other runs
            print(f"warning: skipped {path}: {e}", file=sys.stderr)
    runs = sort_runs(runs, sort)
    return runs[:limit] if limit else runs


def default_config(script: str) -> dict:
    """The app's config defaults, from its entrypoint's config class, imported by name (the core never
    imports an app statically)."""
    from .launcher import config_class

    return to_dict(config_class(script)())


def config_differences(run: Run) -> list[str]:
    """`key: default -> run value` for every key the run set away from its app's defaults."""
    ours = flatten(read_yaml(run.path / "config.yaml"))
    defaults = flatten(default_config(run.script))
    lines = []
    for key, value in ours.items():
        if key not in defaults:
            lines.append(f"{key}: {value!r} (not a key of the defaults)")
        elif defaults[key] != value:
            lines.append(f"{key}: {_short(defaults[key])} -> {_short(value)}")
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def show(path: str | os.PathLike) -> str:
    log_dir = Path(path)
    if not is_run(log_dir):
        raise ConfigError(
            "PATH", f"{log_dir} is not a run folder (config.yaml with metrics/ or checkpoints/)"
        )
    run = read_run(log_dir)
    lines = [
        f"run {run.name} ({_relative(run.path)})",
        f"app {run.app} ({run.script or 'script unknown'}), {run.state}, step {run.step}/{run.total}",
        f"last train loss {_num(run.loss)}, last eval {_eval_text(run.eval, limit=len(run.eval))}",
    ]
    if run.script and run.script != "?":
        try:
            differences = [f"  {line}" for line in config_differences(run)] or ["  none"]
            lines.append(f"config differences from {run.script} defaults (default -> run):")
            lines += differences
        except ConfigError as e:  # the app moved or no longer imports: the rest still helps
            lines.append(f"config differences: unknown ({e})")
    else:
        lines.append("config differences: unknown (no script recorded for this run)")
    checkpoints = list_checkpoints(log_dir / "checkpoints")
    lines.append(f"checkpoints ({len(checkpoints)}):")
    for checkpoint in checkpoints:
        flags = [f for f in (EVAL_FLAG, CONFIRMED) if (checkpoint / f).exists()]
        flags = [{EVAL_FLAG: "eval pending"}.get(f, f) for f in flags]
        lines.append(f"  {checkpoint.name}  {', '.join(flags) or '-'}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every bad input here
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m src.nanollama.runs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    listing = commands.add_parser("list", help="one row per run under ROOT")
    listing.add_argument("root", nargs="?", default="runs", metavar="ROOT")
    listing.add_argument("--sort", choices=SORTS, default="date")
    listing.add_argument("--limit", type=int, default=0, help="at most N rows (0: all)")
    showing = commands.add_parser("show", help="one run: config differences and checkpoints")
    showing.add_argument("path", metavar="PATH")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "list":
        print(format_table(list_runs(args.root, args.sort, args.limit)))
    else:
        print(show(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
