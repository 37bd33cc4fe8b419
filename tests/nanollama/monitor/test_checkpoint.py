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


def fail_writing(monkeypatch, name, error):
    real_save = torch.save

    def fail(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith(name):
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", fail)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {"step": 1})
        fail_writing(monkeypatch, "model.pt", KeyboardInterrupt())  # killed mid-save: nothing cleans up
        with pytest.raises(KeyboardInterrupt):
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
            c.confirm()  # the next step's gradients were finite
        assert steps(tmp_path) == [1, 3, 4]  # 2 removed; 1 awaits its evaluation
        assert clear_eval_flag(tmp_path / "0000000001")
        assert not clear_eval_flag(tmp_path / "0000000001")  # clears exactly once
        c.save(5, model, opt, {})
        c.confirm()
        assert steps(tmp_path) == [4, 5]


def test_eval_flag_survives_same_step_periodic_save(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(keep_only=1), tmp_path) as c:
        c.save(3, model, opt, {})  # periodic save
        c.save(3, model, opt, {}, eval_flag=True)  # eval save on the same step
        assert has_eval_flag(tmp_path / "0000000003")
        c.save(3, model, opt, {})  # a later periodic save of the same step keeps the flag
        c.confirm()
        c.save(4, model, opt, {})
        c.confirm()
        c.save(5, model, opt, {})
        c.confirm()
    assert steps(tmp_path) == [3, 5]
    assert has_eval_flag(tmp_path / "0000000003")


def test_world_size_mismatch_is_a_config_error(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {})
    (tmp_path / "0000000001" / "state_1.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="2 ranks"):
        Checkpointer(CheckpointConfig(), tmp_path).load(tmp_path / "0000000001", model, opt)


def test_keep_only_spares_the_confirmed_until_the_next_is_confirmed(tmp_path):
    """keep_only=1 keeps the last checkpoint whose weights gave finite gradients until a newer one has."""
    model, opt = make()
    with Checkpointer(CheckpointConfig(keep_only=1), tmp_path) as c:
        c.save(1, model, opt, {})
        c.confirm()
        c.save(2, model, opt, {})
        assert steps(tmp_path) == [1, 2]  # 2 is not confirmed yet: 1 stays
        c.save(3, model, opt, {})  # a skipped step saved the same weights again
        assert c.set_aside_unconfirmed() == tmp_path / "0000000001"
        assert steps(tmp_path) == [1]
        assert sorted(p.name for p in tmp_path.glob(".nonfinite-*")) == [
            ".nonfinite-0000000002",
            ".nonfinite-0000000003",
        ]
        c.save(2, model, opt, {})
        c.confirm()
        assert steps(tmp_path) == [2]


def test_non_finite_state_is_never_saved(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {})
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        with pytest.raises(ckpt.NonFiniteStateError, match=r"0\.weight.*last good checkpoint: .*0000000001"):
            c.save(2, model, opt, {})
        with torch.no_grad():
            model[0].weight[0, 0] = 0.0
        next(iter(opt.state.values()))["exp_avg"].fill_(float("inf"))
        with pytest.raises(ckpt.NonFiniteStateError, match="optimizer state"):
            c.save(2, model, opt, {})
    assert steps(tmp_path) == [1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_failed_write_removes_its_folder_and_names_the_os_error(tmp_path, monkeypatch):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {})
        fail_writing(monkeypatch, "model.pt", OSError(28, "No space left on device", "model.pt"))
        with pytest.raises(ckpt.CheckpointWriteError, match="0000000002: No space left on device: model.pt"):
            c.save(2, model, opt, {})
    assert steps(tmp_path) == [1] and not (tmp_path / ".tmp-0000000002").exists()


def test_manifest_catches_truncation_and_bit_flips(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        path = c.save(1, model, opt, {"step": 1})
    assert ckpt.verify_checkpoint(path) is None
    state = path / "state_0.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 1
    state.write_bytes(bytes(data))
    assert "state_0.pt fails its checksum" in ckpt.verify_checkpoint(path)
    shard = next((path / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert "has 10 bytes" in ckpt.verify_checkpoint(path)
    with pytest.raises(ConfigError, match="corrupt checkpoint .*0000000001"):
        ckpt.find_checkpoint(str(path), "")


def test_load_latest_moves_a_corrupt_checkpoint_aside_and_loads_the_previous(tmp_path):
    model, opt = make(0)
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        c.save(1, model, opt, {"step": 1})
        c.save(2, model, opt, {"step": 2})
    shard = next((tmp_path / "0000000002" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    other, other_opt = make(1)
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        path, state = c.load_latest(other, other_opt)
    assert path.name == "0000000001" and state == {"step": 1}
    assert steps(tmp_path) == [1] and (tmp_path / ".corrupt-0000000002" / "dcp").is_dir()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    (tmp_path / "0000000001" / "manifest.json").unlink()  # an unverifiable file that cannot be read
    (tmp_path / "0000000001" / "state_0.pt").write_bytes(b"junk")
    with Checkpointer(CheckpointConfig(), tmp_path) as c, pytest.raises(ckpt.RunError, match="no checkpoint"):
        c.load_latest(other, other_opt)
    assert (tmp_path / ".corrupt-0000000001").is_dir()


def test_load_model_weights_names_a_mismatched_tensor(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        path = c.save(1, model, opt, {})
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(ConfigError, match=r"0\.weight has shape \(8, 4\), the config gives \(16, 4\)"):
        ckpt.load_model_weights(path, wider)


def test_confirmations_outlive_the_process_that_made_them(tmp_path):
    """A restart after a run of skipped steps doubts every checkpoint since the last confirmed one."""
    model, opt = make()
    with Checkpointer(CheckpointConfig(keep_only=1), tmp_path) as c:
        for s in (1, 2, 3):
            c.save(s, model, opt, {"step": s})
            if s == 1:
                c.confirm()  # steps 2 and 3 had nan gradients: their weights are those that gave it
    assert steps(tmp_path) == [1, 2, 3] and (tmp_path / "0000000001" / ckpt.CONFIRMED).exists()
    with Checkpointer(CheckpointConfig(keep_only=1), tmp_path) as c:
        path, _ = c.load_latest(model, opt)
        assert path.name == "0000000003"
        c.save(4, model, opt, {"step": 4})
        assert steps(tmp_path) == [1, 2, 3, 4]  # keep_only spares the confirmed 1 and the doubtful ones
        assert c.set_aside_unconfirmed() == tmp_path / "0000000001"
    assert steps(tmp_path) == [1]


def test_same_size_damage_and_a_lost_manifest_are_caught(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        first, second = c.save(1, model, opt, {}), c.save(2, model, opt, {})
    weights = first / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(first) == "model.pt fails its checksum"
    (second / "manifest.json").unlink()
    assert "no manifest.json" in ckpt.verify_checkpoint(second)


def test_weights_with_nan_are_a_corrupt_checkpoint_even_without_a_manifest(tmp_path):
    model, opt = make()
    with Checkpointer(CheckpointConfig(), tmp_path) as c:
        path = c.save(1, model, opt, {})
    (path / "manifest.json").unlink()  # as written before manifests existed
    state = torch.load(path / "model.pt")
    state["0.weight"][0, 0] = float("nan")
    torch.save(state, path / "model.pt")
    with pytest.raises(ConfigError, match="non-finite values in 0.weight"):
        ckpt.load_model_weights(path, make()[0])
