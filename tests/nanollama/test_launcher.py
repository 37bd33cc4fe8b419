"""The launcher without SLURM: grids, task configs, bad input, the code snapshot, the generated scripts,
a real sweep through `launcher=bash`, asynchronous evaluation jobs and the sweep results table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.nanollama import launcher as launcher_module
from src.nanollama.config import ConfigError
from src.nanollama.jobs import EvalJobConfig, SlurmConfig, clean_env, sbatch_parameters, sbatch_script
from src.nanollama.launcher import (
    LauncherConfig,
    expand_grid,
    load_launch,
    main,
    run_script,
    snapshot_code,
    task_command,
)
from src.nanollama.monitor.checkpoint import has_eval_flag, list_checkpoints
from src.nanollama.monitor.logger import JsonlWriter, read_jsonl
from src.nanollama.monitor.preemption import PreemptionHandler
from src.nanollama.monitor.results import load_sweep, sweep_status
from tests.conftest import LAUNCHER_SWEEP, LAUNCHER_TINY, LAUNCHER_TRAIN, ROOT, child_env, launch

SWEEP, TRAIN, TINY = LAUNCHER_SWEEP, LAUNCHER_TRAIN, LAUNCHER_TINY


# ----------------------------------------------------------------------------- grid


def test_grid_crosses_keys_and_zips_named_groups():
    grid = {"optim": {"lr": [1, 2, 3]}, "zip": {"size": {"model": {"dim": [32, 64], "n_heads": [2, 4]}}}}
    points = expand_grid(grid)
    assert len(points) == 6
    assert {(p["optim.lr"], p["model.dim"], p["model.n_heads"]) for p in points} == {
        (lr, d, h) for lr in (1, 2, 3) for d, h in ((32, 2), (64, 4))
    }


def test_grid_values_may_be_lists_and_nested_keys_go_deep():
    points = expand_grid({"generation": {"prompts": [["a"], ["b", "c"]]}, "a": {"b": {"c": [1, 2]}}})
    assert [p["generation.prompts"] for p in points] == [["a"], ["a"], ["b", "c"], ["b", "c"]]
    assert [p["a.b.c"] for p in points] == [1, 2, 1, 2]
    assert expand_grid({}) == [{}]


@pytest.mark.parametrize(
    "grid, key",
    [
        ({"zip": {"size": {"model": {"dim": [1, 2], "n_heads": [1]}}}}, "grid.zip.size"),
        ({"optim": {"lr": 0.1}}, "grid.optim.lr"),
        ({"optim": {"lr": []}}, "grid.optim.lr"),
    ],
)
def test_bad_grids_name_their_key(grid, key):
    with pytest.raises(ConfigError) as e:
        expand_grid(grid)
    assert e.value.key == key


# ----------------------------------------------------------------------------- tasks


def test_tasks_carry_their_grid_values_own_log_dirs_and_cli_overrides(tmp_path):
    log_dir = tmp_path / "sweep"
    argv = [f"script={TRAIN}", f"config={SWEEP}", "launcher=bash", f"launcher.log_dir={log_dir}"]
    argv += ["launcher.slurm.time=7", "grid.optim.lr=[0.1,0.2,0.3]", "optim.steps=31"]
    sweep, tasks, grid = load_launch(argv)
    assert sweep.mode == "bash" and sweep.slurm.time == 7 and sweep.name == "gssm_sweep"
    assert len(tasks) == 6 and grid["optim"]["lr"] == [0.1, 0.2, 0.3]
    for task in tasks:
        cfg = task.config
        assert cfg.optim.lr == task.values["optim.lr"] and cfg.model.dim == task.values["model.dim"]
        assert cfg.optim.steps == 31
        assert cfg.orchestration.log_dir == str(log_dir / "runs" / str(task.index))
        assert cfg.orchestration.eval_job.script == "src.apps.gssm.eval"
        assert cfg.orchestration.eval_job.launcher == "local"
    assert not log_dir.exists()  # checking writes nothing


def _bad(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["script=src.apps.nope.train"], ["script", "src.apps.nope.train"]),
        (["script=src.nanollama.optim"], ["script", "entrypoint"]),
        (["grid.optim.lrr=[1,2]"], ["grid.optim.lrr", "not a key"]),
        (["grid.optim.lr=[0.1,-4.0]"], ["optim.lr", "task 2", "-4"]),
        (["grid.model.dim=[32]"], ["grid.model.dim", "twice"]),
        (["launcher=slurm"], ["launcher.mode", "slurm"]),
        (["launcher.slurm.time=0"], ["launcher.slurm.time"]),
        (["optim.nope=1"], ["optim.nope"]),
    ],
)
def test_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, capsys, extra, words):
    log_dir = tmp_path / "sweep"
    argv = [f"script={TRAIN}", f"config={SWEEP}", "launcher=bash", f"launcher.log_dir={log_dir}", *extra]
    err = _bad(argv, capsys)
    for word in words:
        assert word in err
    assert not log_dir.exists()


def test_sbatch_without_slurm_suggests_bash(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher_module, "slurm_available", lambda: False)
    argv = [f"script={TRAIN}", f"config={SWEEP}", "launcher=sbatch", f"launcher.log_dir={tmp_path / 's'}"]
    assert "launcher=bash" in _bad(argv, capsys)
    assert not (tmp_path / "s").exists()


def test_existing_sweep_folder_is_kept_unless_overwrite(tmp_path, capsys):
    log_dir = tmp_path / "sweep"
    (log_dir / "runs").mkdir(parents=True)
    (log_dir / "runs" / "precious.txt").write_text("results")
    argv = [f"script={TRAIN}", f"config={SWEEP}", "launcher=bash", f"launcher.log_dir={log_dir}"]
    assert "overwrite=true" in _bad(argv, capsys)
    assert (log_dir / "runs" / "precious.txt").read_text() == "results"
    assert load_launch([*argv, "overwrite=true"])[0].overwrite


# ----------------------------------------------------------------------------- files


def test_snapshot_holds_code_and_configs_only(tmp_path):
    snapshot_code(ROOT, tmp_path / "code")
    files = {str(p.relative_to(tmp_path / "code")) for p in (tmp_path / "code").rglob("*") if p.is_file()}
    assert {"src/nanollama/launcher.py", "src/apps/gssm/configs/debug.yaml", "pyproject.toml"} <= files
    assert "launcher/slurm_local.sh" in files
    assert not any(f.startswith((".git", "tests/", "runs/", "tmp/")) or "__pycache__" in f for f in files)


def test_snapshot_outside_git_skips_hidden_caches_and_data(tmp_path):
    src = tmp_path / "repo"
    for name, text in [("a.py", "x"), ("conf/b.yaml", "y"), (".hidden/c.py", "z"), ("__pycache__/d.py", "w")]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "weights.bin").write_bytes(b"0" * 10)
    (src / "big.json").write_text("0" * (2 << 20))
    snapshot_code(src, tmp_path / "code")
    files = {str(p.relative_to(tmp_path / "code")) for p in (tmp_path / "code").rglob("*") if p.is_file()}
    assert files == {"a.py", "conf/b.yaml"}


def test_sbatch_script_has_resources_array_and_signal(tmp_path):
    slurm = SlurmConfig(nodes=2, gpus_per_node=8, cpus_per_task=12, mem="64G", time=90, partition="learn")
    slurm.account, slurm.qos, slurm.constraint, slurm.exclude = "lab", "high", "h100", "node7"
    slurm.signal_time, slurm.max_parallel = 300, 2
    script = sbatch_script(sbatch_parameters(slurm, "big", 1, ["module load cuda"]), tmp_path, array_size=5)
    for line in [
        "--array=0-4%2",
        "--signal=USR2@300",
        "--time=90",
        "--nodes=2",
        "--gpus-per-node=8",
        "--ntasks-per-node=1",
        "--cpus-per-task=12",
        "--mem=64G",
        "--partition=learn",
        "--account=lab",
        "--qos=high",
        "--constraint=h100",
        "--exclude=node7",
        "--job-name=big",
    ]:
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda" in script and "submitit.core._submit" in script


def test_torchrun_line_takes_the_rendezvous_from_slurm_when_multi_node():
    sweep = LauncherConfig(script=TRAIN, torchrun=True, slurm=SlurmConfig(nodes=2, gpus_per_node=8))
    multi = task_command(sweep, "t.yaml")
    assert "-m torch.distributed.run" in multi and "--nproc-per-node 8" in multi
    assert '--node-rank "$SLURM_NODEID"' in multi and "scontrol show hostnames" in multi
    single = task_command(LauncherConfig(script=TRAIN, torchrun=True, nproc_per_node=2), "t.yaml")
    assert "--standalone --nproc-per-node 2" in single and single.endswith(f'-m {TRAIN} config="t.yaml"')
    plain = task_command(LauncherConfig(script=TRAIN), "t.yaml")
    assert "torch.distributed.run" not in plain


def test_run_sh_runs_from_the_snapshot_and_survives_the_requeue_signals(tmp_path):
    sweep = LauncherConfig(script=TRAIN, name="s", log_dir=str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    sweep.setup = ["echo ready"]
    text = run_script(sweep, 3, Path("/work"))
    assert f"export PYTHONPATH={tmp_path}/code" in text and "export PYTHONSAFEPATH=1" in text
    assert "export OMP_NUM_THREADS=1" in text and "echo ready" in text and "cd /work" in text
    assert "trap '' USR1 USR2" in text and "seq 0 2" in text
    assert f'>>"{tmp_path}/logs/$1.out"' in text


# ----------------------------------------------------------------------------- environment and signals


def test_child_jobs_do_not_inherit_the_job_or_process_group():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_CONF": "/etc/slurm.conf", "RANK": "1"}
    env |= {"WORLD_SIZE": "2", "MASTER_ADDR": "n1", "TORCHELASTIC_RUN_ID": "x", "PATH": "/bin", "X": "1"}
    assert clean_env(env) == {"SLURM_CONF": "/etc/slurm.conf", "PATH": "/bin", "X": "1"}


def test_sigusr2_asks_for_a_checkpoint_like_sigusr1():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert handler.requested


def test_eval_job_lines_survive_a_resume_truncation(tmp_path):
    path = tmp_path / "eval_0.jsonl"
    with JsonlWriter(path) as writer:
        writer.write({"step": 10, "loss": 1.0})
        state = writer.state_dict()
        with JsonlWriter(path) as eval_job:  # another process appending
            eval_job.write({"step": 10, "loss": 0.9, "checkpoint": "ckpt/10"})
        writer.write({"step": 20, "loss": 0.8})
        writer.load_state_dict(state)
        writer.write({"step": 20, "loss": 0.7})
    assert read_jsonl(path) == [
        {"step": 10, "loss": 1.0},
        {"step": 10, "loss": 0.9, "checkpoint": "ckpt/10"},
        {"step": 20, "loss": 0.7},
    ]


def test_local_eval_job_starts_with_a_clean_environment(tmp_path, monkeypatch):
    from src.nanollama.jobs import submit_eval_job

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "envdump.py").write_text(
        "import json, os, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "out = os.path.join(os.path.dirname(args['config']), 'env.json')\n"
        "json.dump({'env': dict(os.environ), 'args': args}, open(out, 'w'))\n"
    )
    (tmp_path / "run" / "logs").mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkg"))
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "RANK": "3", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    pid = submit_eval_job(EvalJobConfig(script="envdump"), tmp_path / "run", tmp_path / "run" / "ckpt")
    assert pid.isdigit()
    out = tmp_path / "run" / "env.json"
    for _ in range(100):
        if out.is_file() and out.stat().st_size:
            break
        time.sleep(0.1)
    dumped = json.loads(out.read_text())
    assert not {"SLURM_JOB_ID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"} & set(dumped["env"])
    assert dumped["args"]["checkpoint"] == str(tmp_path / "run" / "ckpt")


# ----------------------------------------------------------------------------- end to end, in bash


def test_bash_sweep_runs_every_task_from_the_snapshot_and_tabulates(tmp_path):
    log_dir = tmp_path / "sweep"
    out = launch(
        f"script={TRAIN}",
        f"config={SWEEP}",
        "launcher=bash",
        f"launcher.log_dir={log_dir}",
        "grid.optim.lr=[0.001]",
        "model.n_layers=1",
        *TINY,
    )
    assert out.returncode == 0, out.stderr
    assert "2 task(s)" in out.stdout
    status = sweep_status(log_dir)
    assert list(status["state"]) == ["done", "done"] and list(status["model.dim"]) == [32, 64]
    for i, dim in enumerate((32, 64)):
        run = yaml.safe_load((log_dir / "runs" / str(i) / "config.yaml").read_text())
        assert run["model"]["dim"] == dim and run["optim"]["lr"] == 0.001
    table = load_sweep(log_dir)
    assert sorted(zip(table["task"], table["step"])) == [(0, 3), (0, 6), (1, 3), (1, 6)]
    assert {"optim.lr", "model.dim", "model.n_heads", "loss", "state"} <= set(table.columns)
    # tasks run the snapshot's code, not the repo's: `run.sh` reruns the task from it
    snapshot = log_dir / "code" / "src" / "apps" / "gssm" / "train.py"
    future = "from __future__ import annotations\n"
    snapshot.write_text(snapshot.read_text().replace(future, future + "raise SystemExit(3)\n"))
    rerun = subprocess.run(["bash", str(log_dir / "run.sh"), "0"], cwd=ROOT, env=child_env(), timeout=120)
    assert rerun.returncode == 3


def test_async_eval_jobs_evaluate_flagged_checkpoints_and_clear_their_flags(tmp_path):
    log_dir = tmp_path / "run"
    args = [f"config={ROOT / 'src/apps/gssm/configs/debug.yaml'}", f"orchestration.log_dir={log_dir}"]
    args += [
        *TINY,
        "evaluation.period=3",
        "evaluation.asynchronous=true",
        "orchestration.checkpoint.keep_only=1",
    ]
    args += ["orchestration.eval_job.script=src.apps.gssm.eval", "model.n_layers=1"]
    out = subprocess.run(
        [sys.executable, "-m", TRAIN, *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    checkpoints = list_checkpoints(log_dir / "checkpoints")
    assert [int(p.name) for p in checkpoints] == [3, 6]  # keep_only=1 kept the one awaiting evaluation
    deadline = time.time() + 120
    while any(has_eval_flag(p) for p in checkpoints) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(has_eval_flag(p) for p in checkpoints)
    lines = [r for r in read_jsonl(log_dir / "metrics" / "eval_0.jsonl") if "checkpoint" in r]
    assert sorted(r["step"] for r in lines) == [3, 6] and all("bayes_loss" in r for r in lines)


FAKE_PYTHON = """#!/bin/sh
case "$3" in  # run.sh runs: python -m script config=.../tasks/I.yaml
  *tasks/0.yaml) exit 0 ;;
  *tasks/1.yaml) echo boom >&2; exit 3 ;;
  *tasks/2.yaml) echo "$PREFIX.SignalException: Process 7 got signal: 15" >&2; exit 1 ;;
  *) echo started; exec sleep 30 ;;
esac
"""


def status_of(log_dir: Path, task: int) -> dict:
    return json.loads((log_dir / "tasks" / f"{task}.status").read_text())


def test_run_sh_keeps_task_status_says_what_stopped_a_task_and_fails_if_any_task_did(tmp_path):
    """Tasks of a fake interpreter: 0 succeeds, 1 fails, 2 is torchrun stopped by SIGTERM (rc 1 and a
    SignalException, its workers having checkpointed), 3 runs until its process group gets SIGTERM."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log_dir = tmp_path / "sweep"
    for sub in ("tasks", "logs"):
        (log_dir / sub).mkdir(parents=True)
    env = {"PREFIX": "torch.distributed.elastic.multiprocessing.api"}
    sweep = LauncherConfig(script=TRAIN, name="s", log_dir=str(log_dir), python=str(python), env=env)
    run_sh = log_dir / "run.sh"
    run_sh.write_text(run_script(sweep, 3, tmp_path))
    out = subprocess.run(["bash", str(run_sh)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "2 of 3 task(s) failed or stopped" in out.stderr, out.stderr
    assert "task 1: exit code 3" in out.stderr
    assert "task 2 stopped by SIGTERM (exit code 1): `bash run.sh 2` resumes it" in out.stderr
    assert [status_of(log_dir, i)["state"] for i in range(3)] == ["done", "failed", "stopped"]
    assert status_of(log_dir, 1)["exit_code"] == 3 and status_of(log_dir, 2)["signal"] == "TERM"
    assert {"host", "time", "job_id"} <= status_of(log_dir, 0).keys()

    proc = subprocess.Popen(["bash", str(run_sh), "3"], start_new_session=True)
    deadline = time.monotonic() + 30
    while (
        not (log_dir / "logs" / "3.out").is_file()
        or "started" not in (log_dir / "logs" / "3.out").read_text()
    ):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert status_of(log_dir, 3)["state"] == "running"
    os.killpg(proc.pid, signal.SIGTERM)  # a preemption: the shell outlives it and records it
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert status_of(log_dir, 3) | {"host": 0, "time": 0, "job_id": 0} == {
        "state": "stopped",
        "exit_code": 128 + signal.SIGTERM,
        "signal": "TERM",
        "host": 0,
        "time": 0,
        "job_id": 0,
    }
