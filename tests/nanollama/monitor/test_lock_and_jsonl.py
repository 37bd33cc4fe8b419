import json
import subprocess
import sys
import textwrap

from src.nanollama.monitor.lock import LogDirLock
from src.nanollama.monitor.logger import JsonlWriter, read_jsonl
from tests.conftest import ROOT


def test_the_lock_dies_with_its_process_not_with_its_forked_children(tmp_path):
    """DataLoader workers are forked: they must not keep a killed run's log dir locked."""
    holder = textwrap.dedent(f"""
        import os, sys, time
        from src.nanollama.monitor.lock import LogDirLock
        assert LogDirLock({str(tmp_path)!r}).acquire() is None
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        print("locked", flush=True)
        sys.stdin.readline()
        os._exit(0)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    assert LogDirLock(tmp_path).acquire() == f"host {__import__('socket').gethostname()}, pid {proc.pid}"
    proc.stdin.close()
    proc.wait()  # the holder exits; its forked child lives on
    lock = LogDirLock(tmp_path)
    assert lock.acquire() is None
    lock.release()


def test_a_torn_line_is_dropped_on_resume_and_skipped_by_readers(tmp_path):
    path = tmp_path / "raw_0.jsonl"
    with JsonlWriter(path) as w:
        w.write({"step": 1, "loss": 2.0})
        state = w.state_dict()
        w.write({"step": 2, "loss": 1.5, "checkpoint": "c"})
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a writer killed mid-line
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "checkpoint": "c"}]
    with JsonlWriter(path) as w:
        w.load_state_dict(state)
        w.write({"step": 2, "loss": 1.4})
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole again
    assert [r["step"] for r in lines] == [1, 2, 2] and lines[1]["checkpoint"] == "c"
