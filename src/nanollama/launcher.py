"""Launch any app entrypoint anywhere: one run, or a sweep of a grid of configs, in bash or on SLURM.

    python -m src.nanollama.launcher script=src.apps.gssm.train config=src/apps/gssm/configs/sweep.yaml \
        [launcher=sbatch|bash] [torchrun=true] [overwrite=true] [launcher.slurm.time=30] [optim.lr=1e-3 ...]

The config's `launcher:` section says where and how (see `LauncherConfig`), its `grid:` section which
values to sweep; every other section is the run config. Everything is checked before anything is
written: the script imports, every grid key is a config key, every task's config validates. Then the
sweep folder gets the task configs, a snapshot of the code the tasks run from, and `run.sh`:

    {log_dir}/sweep.yaml        script, launcher config, grid and each task's grid values
    {log_dir}/run.sh            `bash run.sh I` runs task I exactly as the job does; no argument: all
    {log_dir}/code/             the code snapshot (editing the repo later changes nothing in flight)
    {log_dir}/tasks/{i}.yaml    task i's full run config; tasks/{i}.status its state
    {log_dir}/runs/{i}/         task i's run (orchestration.log_dir)
    {log_dir}/logs/{i}.out|err  task i's stdout and stderr
    {log_dir}/submitit/         the submitted sbatch script and submitit's logs
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .app import RunConfig
from .config import (
    DEFAULTS,
    ConfigError,
    FileError,
    build_config,
    check_presets,
    cli_main,
    config_layers,
    merge_config,
    merge_layers,
    parse_cli,
    preset_layers,
    to_dict,
    to_yaml,
)
from .extras import MissingExtra
from .jobs import Command, SlurmConfig, clean_environment, sbatch_parameters, slurm_available, submit

ROOT = Path(__file__).resolve().parents[2]  # the repository (or snapshot) this code runs from
SNAPSHOT_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".json", ".ipynb"}
SNAPSHOT_SKIP_DIRS = {"runs", "logs", "data", "wandb", "tests", "notebooks", "tmp"}  # top-level folders
SNAPSHOT_MAX_BYTES = 1 << 20  # larger files are data, not code
ZIP = "zip"  # grid key of the named groups whose keys vary together
SHORTCUTS = {"script": "script", "launcher": "mode", "torchrun": "torchrun", "overwrite": "overwrite"}


@dataclass
class LauncherConfig:
    script: str = ""  # the entrypoint module, e.g. src.apps.gssm.train; CLI: script=
    name: str = ""  # sweep name; empty: the run config's orchestration.name
    log_dir: str = ""  # the sweep folder; empty: runs/{name}
    mode: str = "auto"  # sbatch | bash | auto (sbatch where SLURM is installed, else bash); CLI: launcher=
    torchrun: bool = False  # each task under torchrun, nproc_per_node processes per node; CLI: torchrun=
    nproc_per_node: int = 0  # processes per node; 0: gpus_per_node, or 1 without GPUs
    overwrite: bool = False  # replace an existing sweep folder; CLI: overwrite=
    python: str = ""  # interpreter of the tasks; empty: the one running the launcher
    setup: list[str] = field(default_factory=list)  # shell lines run before each task (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # environment variables of every task
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        if not self.script:
            raise ConfigError("script", "missing: the entrypoint module, e.g. script=src.apps.gssm.train")
        if self.mode not in ("sbatch", "bash", "auto"):
            raise ConfigError("mode", f"'{self.mode}' is not one of sbatch, bash, auto")
        if self.nproc_per_node < 0:
            raise ConfigError("nproc_per_node", f"must be >= 0, got {self.nproc_per_node}")

    @property
    def nproc(self) -> int:
        return self.nproc_per_node or self.slurm.gpus_per_node or 1


@dataclass
class Task:
    index: int
    values: dict[str, Any]  # dotted grid key -> value
    config: RunConfig  # the validated run config


# ----------------------------------------------------------------------------- grid


def _leaves(tree: Any, prefix: str) -> dict[str, list]:
    """Nested grid keys -> their lists of values."""
    if isinstance(tree, dict):
        out: dict[str, list] = {}
        for key, sub in tree.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if not isinstance(tree, list) or not tree:
        raise ConfigError(f"grid.{prefix}", f"must be a non-empty list of values, got {tree!r}")
    return {prefix: tree}


def expand_grid(grid: dict | None) -> list[dict[str, Any]]:
    """The points of a grid, each {dotted key: value}: keys cross, except that the keys of each named
    group under `zip:` vary together (equal-length lists). A value may itself be a list or a mapping."""
    grid = dict(grid or {})
    groups = grid.pop(ZIP, {}) or {}
    if not isinstance(groups, dict):
        raise ConfigError(f"grid.{ZIP}", "must map group names to nested keys with lists of values")
    axes = [[{key: v} for v in values] for key, values in _leaves(grid, "").items()] if grid else []
    for name, tree in groups.items():
        leaves = _leaves(tree, "")
        lengths = {len(values) for values in leaves.values()}
        if len(lengths) != 1:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in leaves.items())
            raise ConfigError(f"grid.{ZIP}.{name}", f"zipped lists differ in length ({sizes})")
        axes.append([{k: v[j] for k, v in leaves.items()} for j in range(lengths.pop())])
    keys = [key for axis in axes for key in axis[0]]
    for key in {k for k in keys if keys.count(k) > 1}:
        raise ConfigError(f"grid.{key}", "appears twice (crossed and zipped, or in two zipped groups)")
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


# ----------------------------------------------------------------------------- tasks


def config_class(script: str) -> type[RunConfig]:
    """The run-config dataclass of an entrypoint module (`main.config_class`, an `app.RunConfig`); the
    module must import."""
    try:
        module = importlib.import_module(script)
    except Exception as e:  # noqa: BLE001 (any import failure is the user's script failing to import)
        reason = (str(e).splitlines() or [""])[0]
        raise ConfigError("script", f"cannot import {script}: {type(e).__name__}: {reason}") from None
    cls = getattr(getattr(module, "main", None), "config_class", None)
    if not (isinstance(cls, type) and issubclass(cls, RunConfig)):
        raise ConfigError("script", f"{script} has no main made by an entrypoint (it names the run config)")
    return cls


def split_cli(argv: list[str]) -> tuple[str | None, list[str], list[str], list[str]]:
    """`key=value` arguments -> (config path, launcher overrides, grid overrides, run overrides)."""
    config, overrides = parse_cli(argv)
    launcher, grid, run = [], [], []
    for arg in overrides:
        key, value = arg.split("=", 1)
        if key in SHORTCUTS:
            launcher.append(f"{SHORTCUTS[key]}={value}")
        elif key.startswith(("launcher.", "grid.")):
            (launcher if key.startswith("launcher.") else grid).append(arg.split(".", 1)[1])
        else:
            run.append(arg)
    return config, launcher, grid, run


def _check_key(base: DictConfig, key: str, cls: type) -> None:
    missing = object()
    try:
        found = OmegaConf.select(base, key, default=missing)
    except Exception:  # noqa: BLE001 (a malformed path is just as unknown)
        found = missing
    if found is missing:
        raise ConfigError(f"grid.{key}", f"not a key of the run config ({cls.__name__})")


def build_tasks(
    cls: type, layers: list[tuple[str, dict]], overrides: list[str], points: list[dict], sweep: LauncherConfig
):
    """Every task's validated config, each with its own log dir under the sweep folder. `layers` are the
    config file's presets, then its own keys (see `config.config_layers`); a grid's `defaults` value is
    a list of presets merged after the file's presets and before its own keys, like its `defaults:`."""
    run_data = merge_layers(layers)
    base = merge_config(cls, run_data, overrides)
    for key in points[0]:
        if key != DEFAULTS:
            _check_key(base, key, cls)
    eval_script = _sibling_eval(sweep)
    origin = f"{layers[-1][0]}: grid.{DEFAULTS}" if layers else f"grid.{DEFAULTS}"
    tasks = []
    for i, values in enumerate(points):
        task_layers = layers
        if DEFAULTS in values:
            entries = values[DEFAULTS]  # one preset may be written without its list
            presets = preset_layers([entries] if isinstance(entries, str) else entries, origin)
            check_presets(cls, presets)
            task_layers = layers[:-1] + presets + layers[-1:]
        data = OmegaConf.merge(OmegaConf.create(merge_layers(task_layers)), OmegaConf.from_dotlist(overrides))
        for key, value in values.items():
            if key != DEFAULTS:
                OmegaConf.update(data, key, value, merge=False)
        OmegaConf.update(data, "orchestration.name", f"{sweep.name}_{i}", merge=False)
        OmegaConf.update(
            data, "orchestration.log_dir", str(Path(sweep.log_dir) / "runs" / str(i)), merge=False
        )
        try:
            cfg = build_config(cls, OmegaConf.to_container(data), [])
        except MissingExtra:  # the same for every task
            raise
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in values.items()) or "the only task"
            raise ConfigError(e.key, f"{e.message} (task {i}: {where})") from None
        _set_eval_job(cfg, sweep, eval_script, run_data)
        tasks.append(Task(i, values, cfg))
    return tasks


def _sibling_eval(sweep: LauncherConfig) -> str:
    """The app's eval module beside its train module, for asynchronous evaluation jobs."""
    package = sweep.script.rsplit(".", 1)[0]
    return f"{package}.eval" if importlib.util.find_spec(f"{package}.eval") else ""


def _set_eval_job(cfg: RunConfig, sweep: LauncherConfig, eval_script: str, run_data: dict) -> None:
    """Evaluation jobs of a task run where the task runs, with the sweep's SLURM account and partition."""
    job = cfg.orchestration.eval_job
    job.script = job.script or eval_script
    job.launcher = "sbatch" if sweep.mode == "sbatch" else "local"
    job.setup = job.setup or list(sweep.setup)
    if "slurm" not in (run_data.get("orchestration", {}).get("eval_job") or {}):
        job.slurm = dataclasses.replace(sweep.slurm, nodes=1, gpus_per_node=min(1, sweep.slurm.gpus_per_node))


# ----------------------------------------------------------------------------- files


def code_files(root: Path) -> list[Path]:
    """The files of the code: git's view of the repository (tracked and not ignored) when it is one,
    else every file but hidden folders and caches (a snapshot launching a sweep of its own)."""
    git = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=False,
    )
    if git.returncode == 0:
        paths = [root / name for name in git.stdout.split("\0") if name]
    else:
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            paths += [Path(folder) / name for name in files]
    return sorted(p for p in paths if p.suffix in SNAPSHOT_SUFFIXES and p.is_file())


def snapshot_code(root: Path, dest: Path) -> int:
    """Copy the code (Python files and configs: no .git, logs, data or large files); returns the count."""
    count = 0
    for path in code_files(root):
        rel = path.relative_to(root)
        if rel.parts[0] in SNAPSHOT_SKIP_DIRS or path.stat().st_size > SNAPSHOT_MAX_BYTES:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        count += 1
    return count


def task_command(sweep: LauncherConfig, config_path: str) -> str:
    """The shell command of one task: python, or torchrun with the rendezvous from SLURM when multi-node."""
    python = shlex.quote(sweep.python or sys.executable)
    run = f'-m {sweep.script} config="{config_path}"'
    if not sweep.torchrun:
        return f"{python} {run}"
    if sweep.slurm.nodes > 1:
        rendezvous = (
            '--nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" '
            '--master-addr "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" '
            '--master-port "$((20000 + SLURM_JOB_ID % 20000))"'
        )
    else:
        rendezvous = "--standalone"
    return f"{python} -m torch.distributed.run {rendezvous} --nproc-per-node {sweep.nproc} {run}"


# run.sh's own part, the same for every sweep: the task's status file, and how the task ended.
TASK_STATUS = r"""status() {  # STATE [EXIT_CODE [SIGNAL]]: tasks/$task.status as jobs.write_status writes it
    [ "${SLURM_PROCID:-0}" = 0 ] || return 0
    local file="$sweep/tasks/$task.status"
    printf '{"state": "%s", "host": "%s", "time": %s, "job_id": "%s"%s%s}\n' "$1" "$HOSTNAME" "$(date +%s)" \
        "${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}" "${2:+, \"exit_code\": $2}" "${3:+, \"signal\": \"$3\"}" \
        >"$file.tmp" && mv "$file.tmp" "$file"
}"""
TASK_END = r"""code=$?
# torchrun signalled alone exits 1 with a SignalException traceback, its workers having checkpointed
caught=$(tail -c +$((start + 1)) "$err" | grep -o "SignalException: Process [0-9]* got signal: [0-9]*")
[ -n "$signal" ] || [ -z "$caught" ] || signal=$(kill -l "${caught##* }")
if [ -n "$signal" ]; then
    echo "task $task stopped by SIG$signal (exit code $code): \`bash run.sh $task\` resumes it" >&2
    status stopped "$code" "$signal"
    [ "$signal" != INT ] || { trap - INT; kill -INT $$; }  # an interrupt stops the caller's loop too
elif [ "$code" -eq 0 ]; then
    status done 0
else
    status failed "$code"
fi
exit $code"""


def run_script(sweep: LauncherConfig, n_tasks: int, cwd: Path) -> str:
    """`run.sh`: the whole environment of a task, so that a person can rerun exactly what ran. It keeps
    `tasks/{i}.status` up to date (running, then done, failed or stopped by a signal) however it is run,
    and its loop over all tasks exits 1 if any failed."""
    log_dir = Path(sweep.log_dir)
    env = {"PYTHONPATH": str(log_dir / "code"), "PYTHONSAFEPATH": "1", **sweep.env}
    command = task_command(sweep, f"{log_dir}/tasks/$1.yaml")
    lines = [
        "#!/usr/bin/env bash",
        f"# Sweep {sweep.name}: `bash run.sh I` runs task I as its job does; no argument: all {n_tasks}.",
        "# The code is the snapshot in code/ (PYTHONSAFEPATH keeps the working directory off sys.path).",
        "set -u",
        "if [ $# -eq 0 ]; then",
        "    failed=0",
        f"    for i in $(seq 0 {n_tasks - 1}); do",
        '        bash "$0" "$i" || { echo "task $i: exit code $?" >&2; failed=$((failed + 1)); }',
        "    done",
        f'    [ "$failed" = 0 ] || {{ echo "$failed of {n_tasks} task(s) failed or stopped" >&2; exit 1; }}',
        "    exit 0",
        "fi",
        f"sweep={shlex.quote(str(log_dir))} task=$1",
        f'err="{log_dir}/logs/$1.err"',
        TASK_STATUS,
        f"cd {shlex.quote(str(cwd))}",
        *(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()),
        *sweep.setup,
        "# the task's processes checkpoint and stop on these; the shell and torchrun must not die of them",
        "trap '' USR1 USR2",
        "# on SIGTERM (preemption, scancel) or SIGINT the shell waits for the task, then says it was stopped",
        "signal=''",
        "trap 'signal=TERM' TERM",
        "trap 'signal=INT' INT",
        "status running",
        ': >>"$err"',
        'start=$(wc -c <"$err")',
        f'{command} >>"{log_dir}/logs/$1.out" 2>>"$err"',
        TASK_END,
    ]
    return "\n".join(lines) + "\n"


def write_sweep(sweep: LauncherConfig, tasks: list[Task], grid: dict, cwd: Path) -> None:
    log_dir = Path(sweep.log_dir)
    for sub in ("tasks", "logs", "runs"):
        (log_dir / sub).mkdir(parents=True, exist_ok=True)
    snapshot_code(ROOT, log_dir / "code")
    for task in tasks:
        (log_dir / "tasks" / f"{task.index}.yaml").write_text(to_yaml(task.config))
    record = {
        "script": sweep.script,
        "launcher": to_dict(sweep),
        "grid": grid,
        "tasks": [{"index": t.index, "values": t.values} for t in tasks],
    }
    (log_dir / "sweep.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    (log_dir / "run.sh").write_text(run_script(sweep, len(tasks), cwd))


def task_commands(sweep: LauncherConfig, n_tasks: int) -> list[Command]:
    log_dir = Path(sweep.log_dir)
    grace = max(sweep.slurm.signal_time - 15, sweep.slurm.signal_time / 2)
    return [
        Command(
            ["bash", str(log_dir / "run.sh"), str(i)],
            status=str(log_dir / "tasks" / f"{i}.status"),
            grace_s=grace,
        )
        for i in range(n_tasks)
    ]


# ----------------------------------------------------------------------------- main


def load_launch(argv: list[str]) -> tuple[LauncherConfig, list[Task], dict]:
    """Parse and check everything; nothing is written."""
    config, launcher_overrides, grid_overrides, run_overrides = split_cli(argv)
    layers = config_layers(config) if config else []
    data = merge_layers(layers)
    for path, layer in layers[:-1]:  # a preset's launcher keys are named with its file
        try:
            merge_config(LauncherConfig, layer.get("launcher") or {})
        except ConfigError as e:
            raise FileError(path, str(e.prefixed("launcher"))) from None
    try:
        sweep = build_config(LauncherConfig, data.get("launcher") or {}, launcher_overrides)
    except ConfigError as e:
        raise e.prefixed("launcher") from None
    cls = config_class(sweep.script)
    grid = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.create(data.get("grid") or {}), OmegaConf.from_dotlist(grid_overrides))
    )
    run_layers = [(path, {k: v for k, v in d.items() if k not in ("launcher", "grid")}) for path, d in layers]
    check_presets(cls, run_layers[:-1])
    plain = OmegaConf.merge(OmegaConf.create(merge_layers(run_layers)), OmegaConf.from_dotlist(run_overrides))
    sweep.name = sweep.name or OmegaConf.select(plain, "orchestration.name", default=None) or "sweep"
    sweep.log_dir = str(Path(sweep.log_dir or f"runs/{sweep.name}").resolve())
    for protected in (Path.cwd().resolve(), ROOT):
        if protected.is_relative_to(sweep.log_dir):
            raise ConfigError("launcher.log_dir", f"{sweep.log_dir} contains {protected}")
    if sweep.mode == "auto":
        sweep.mode = "sbatch" if slurm_available() else "bash"
    if sweep.mode == "sbatch" and not slurm_available():
        raise ConfigError("launcher", "sbatch: SLURM is not installed here (no sbatch); use launcher=bash")
    tasks = build_tasks(cls, run_layers, run_overrides, expand_grid(grid), sweep)
    if Path(sweep.log_dir).exists() and not sweep.overwrite:
        raise ConfigError("launcher.log_dir", f"{sweep.log_dir} exists; pass overwrite=true to replace it")
    return sweep, tasks, grid


def launch(argv: list[str]) -> str:
    """Check, write the sweep folder, then submit (sbatch) or run (bash); returns the job id or 'bash'."""
    sweep, tasks, grid = load_launch(argv)
    log_dir = Path(sweep.log_dir)
    if log_dir.exists():
        shutil.rmtree(log_dir)
    write_sweep(sweep, tasks, grid, Path.cwd())
    commands = task_commands(sweep, len(tasks))
    where = f"logs in {log_dir}/logs, runs in {log_dir}/runs"
    if sweep.mode == "bash":
        print(f"running {len(tasks)} task(s) one after another; {where}", flush=True)
        failed = 0
        for task, command in zip(tasks, commands):
            try:
                with clean_environment():
                    command()
                print(f"task {task.index} done {task.values}", flush=True)
            except RuntimeError:
                failed += 1
                print(f"task {task.index} failed: see {log_dir}/logs/{task.index}.err", flush=True)
        if failed:
            raise SystemExit(f"{failed} of {len(tasks)} task(s) failed")
        return "bash"
    tasks_per_node = 1 if sweep.torchrun else sweep.nproc
    # submitit's own process unpickles our Command: from the snapshot too
    setup = [f"export PYTHONPATH={log_dir / 'code'}", "export PYTHONSAFEPATH=1", *sweep.setup]
    params = sbatch_parameters(sweep.slurm, sweep.name, tasks_per_node, setup)
    try:
        job_id = submit(commands, params, log_dir / "submitit")
    except Exception as e:  # noqa: BLE001 (sbatch refused: nothing was submitted, so nothing is kept)
        shutil.rmtree(log_dir, ignore_errors=True)
        raise SystemExit(f"error: submission failed: {e}") from None
    print(f"submitted job {job_id}: {len(tasks)} task(s); {where}", flush=True)
    return job_id


@cli_main
def main(argv: list[str] | None = None) -> None:
    launch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
