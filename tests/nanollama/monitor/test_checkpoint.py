import pytest
import torch

from src.nanollama.config import ConfigError
from src.nanollama.monitor import checkpoint as ckpt
from src.nanollama.monitor.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    clear_eval_flag,
    has_eval_flag,
    latest_checkpoint,
    list_checkpoints,
)


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def steps(root):
    return [ckpt.checkpoint_step(p) for p in list_checkpoints(root)]


def test_save_load_roundtrip(tmp_path):
    model, opt = make(0)
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(5, model, opt, {"step": 5, "extra": [1, 2]})
    other, other_opt = make(1)
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        state = c.load(latest_checkpoint(tmp_path), other, other_opt)
    assert state == {"step": 5, "extra": [1, 2]}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert torch.load(tmp_path / "0000000005" / "model.pt").keys() == model.state_dict().keys()


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {"step": 1})
        real_save = torch.save

        def crash(obj, f, *a, **k):
            if str(f).endswith("model.pt"):
                raise OSError("disk full")
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(ckpt.torch, "save", crash)
        with pytest.raises(OSError):
            c.save(2, model, opt, {"step": 2})
        monkeypatch.undo()
    assert steps(tmp_path) == [1]  # the half-written step 2 is never listed
    assert (tmp_path / ".tmp-0000000002").exists()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:  # a restart cleans it up and saves again
        assert not (tmp_path / ".tmp-0000000002").exists()
        c.save(2, model, opt, {"step": 2})
    assert steps(tmp_path) == [1, 2]


def test_keep_only_spares_eval_flagged(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(keep_only=2), tmp_path) as c:
        c.save(1, model, opt, {}, eval_flag=True)
        for s in (2, 3, 4):
            c.save(s, model, opt, {})
        assert steps(tmp_path) == [1, 3, 4]  # 2 removed; 1 awaits its evaluation
        assert clear_eval_flag(tmp_path / "0000000001")
        assert not clear_eval_flag(tmp_path / "0000000001")  # clears exactly once
        c.save(5, model, opt, {})
        assert steps(tmp_path) == [4, 5]


def test_eval_flag_survives_same_step_periodic_save(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(keep_only=1), tmp_path) as c:
        c.save(3, model, opt, {})  # periodic save
        c.save(3, model, opt, {}, eval_flag=True)  # eval save on the same step
        assert has_eval_flag(tmp_path / "0000000003")
        c.save(3, model, opt, {})  # a later periodic save of the same step keeps the flag
        c.save(4, model, opt, {})
        c.save(5, model, opt, {})
    assert steps(tmp_path) == [3, 5]
    assert has_eval_flag(tmp_path / "0000000003")


def test_world_size_mismatch_is_a_config_error(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {})
    (tmp_path / "0000000001" / "state_1.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="2 ranks"):
        Checkpointer(CheckpointConfig(), tmp_path).load(tmp_path / "0000000001", model, opt)
