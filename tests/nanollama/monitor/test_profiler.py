import csv
import time

import torch

from src.nanollama.monitor.logger import JsonlWriter, read_jsonl
from src.nanollama.monitor.profiler import (
    COLUMNS,
    HeavyProfiler,
    HeavyProfilerConfig,
    LightProfiler,
    LightProfilerConfig,
)

CPU = torch.device("cpu")


def run_steps(prof, first, last):
    for step in range(first, last + 1):
        with prof.phase("data"):
            time.sleep(0.001)
        with prof.phase("model"):
            time.sleep(0.002)
        prof.end_step(step, tokens=100)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rows_phases_and_memory(tmp_path):
    path = tmp_path / "profile_0.csv"
    with LightProfiler(LightProfilerConfig(), path, CPU, total_steps=3) as prof:
        run_steps(prof, 1, 3)
    table = rows(path)
    assert list(table[0].keys()) == COLUMNS
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    for r in table:
        assert float(r["model_s"]) >= 0.002 and float(r["data_s"]) >= 0.001
        assert float(r["step_s"]) >= float(r["model_s"]) + float(r["data_s"])
        assert float(r["rss_mb"]) > 10
        assert abs(float(r["tokens_per_s"]) * float(r["step_s"]) - 100) < 1e-3 * 100


def test_default_steps_follow_the_run_and_period(tmp_path):
    path = tmp_path / "p.csv"
    with LightProfiler(LightProfilerConfig(period=2), path, CPU, total_steps=5) as prof:
        run_steps(prof, 1, 8)  # beyond total_steps nothing more is profiled
    assert [int(r["step"]) for r in rows(path)] == [2, 4]
    with LightProfiler(LightProfilerConfig(steps=2), tmp_path / "q.csv", CPU, total_steps=5) as prof:
        run_steps(prof, 1, 5)
    assert [int(r["step"]) for r in rows(tmp_path / "q.csv")] == [1, 2]


def test_resume_truncates_and_continues_without_gap_or_duplicate(tmp_path):
    path = tmp_path / "p.csv"
    with LightProfiler(LightProfilerConfig(), path, CPU, total_steps=10) as prof:
        run_steps(prof, 1, 4)
        saved = prof.state_dict()  # checkpoint after step 4
        run_steps(prof, 5, 6)  # then the run dies at step 6
    with LightProfiler(LightProfilerConfig(), path, CPU, total_steps=10) as prof:
        prof.load_state_dict(saved)
        run_steps(prof, 5, 10)
    assert [int(r["step"]) for r in rows(path)] == list(range(1, 11))  # one header, no duplicate


def test_jsonl_writer_resume(tmp_path):
    path = tmp_path / "raw_0.jsonl"
    with JsonlWriter(path) as w:
        w.write({"step": 1, "loss": 1.0})
        state = w.state_dict()
        w.write({"step": 2, "loss": 2.0})
    with JsonlWriter(path) as w:
        w.load_state_dict(state)
        w.write({"step": 2, "loss": 3.0})
    assert read_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 3.0}]


def test_heavy_profiler_writes_a_chrome_trace(tmp_path):
    model = torch.nn.Linear(16, 16)
    with HeavyProfiler(HeavyProfilerConfig(start=2, warmup=1, steps=2), tmp_path, 0, CPU) as heavy:
        heavy.start(0)
        for _ in range(6):
            model(torch.randn(4, 16)).sum().backward()
            heavy.step()
    traces = list(tmp_path.glob("trace_rank0_*.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    with HeavyProfiler(HeavyProfilerConfig(start=2), tmp_path / "late", 0, CPU) as heavy:
        heavy.start(5)  # resumed past the window: nothing
        heavy.step()
    assert not (tmp_path / "late").exists()
