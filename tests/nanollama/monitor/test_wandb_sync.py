"""wandb_sync in offline mode: the history is read back from the run's `.wandb` file (wandb writes no
summary file offline), a log of protobuf `Record`s in LevelDB-log framing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml

from src.nanollama.monitor.logger import JsonlWriter
from tests.conftest import run_module

BLOCK, HEADER = 32768, 7  # LevelDB log framing: 32 KiB blocks, 7-byte chunk headers (crc, length, type)


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, pos = [], b"", HEADER  # the file starts with its own 7-byte header
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def history(records: list) -> dict[int, dict]:
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def fake_run(log_dir: Path) -> None:
    """A run folder as a run with wandb off leaves it."""
    (log_dir / "metrics").mkdir(parents=True)
    config = {
        "orchestration": {"name": "fake", "wandb": {"mode": "disabled", "project": "p"}},
        "optim": {"lr": 0.01},
    }
    (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with JsonlWriter(log_dir / "metrics" / "raw_0.jsonl") as raw:
        for step in range(1, 6):
            raw.write({"step": step, "loss": 3.0 / step, "lr": 0.01})
    with JsonlWriter(log_dir / "metrics" / "eval_0.jsonl") as evals:
        evals.write({"step": 5, "loss": 0.7, "bayes_loss": 0.5, "gap": 0.2})
        evals.write(
            {"step": 5, "loss": 0.7, "bayes_loss": 0.5, "gap": 0.2, "checkpoint": "/x"}
        )  # from eval.py
    with JsonlWriter(log_dir / "metrics" / "probe_0.jsonl") as probe:
        probe.write({"step": 2, "layer_1/resid_std": 0.5})
    results = [{"node": "z", "layer": 0, "accuracy": 0.9}]
    (log_dir / "metrics" / "probe_accuracy.json").write_text(json.dumps({"results": results}))


def test_offline_sync_logs_every_step(tmp_path):
    log_dir = tmp_path / "run"
    fake_run(log_dir)
    out = run_module("src.nanollama.monitor.wandb_sync", f"log_dir={log_dir}", "mode=offline")
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (log_dir / "wandb").glob("offline-run-*")
    records = read_records(next(folder.glob("run-*.wandb")))
    steps = history(records)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[3] == {"step": 3, "loss": 1.0, "lr": 0.01}
    assert steps[2]["probe/layer_1/resid_std"] == 0.5
    assert {"eval/loss": 0.7, "eval/bayes_loss": 0.5, "eval/gap": 0.2}.items() <= steps[5].items()
    assert not any("checkpoint" in key for key in steps[5])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "fake" and run.project == "p"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optim"] == {"lr": 0.01}
    summary = [i for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update]
    assert any("probe_accuracy" in (i.key or "/".join(i.nested_key)) for i in summary)


def test_not_a_run_folder_exits_2(tmp_path):
    out = run_module("src.nanollama.monitor.wandb_sync", f"log_dir={tmp_path}", "mode=offline")
    assert out.returncode == 2 and "log_dir" in out.stderr
