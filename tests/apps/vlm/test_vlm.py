"""The VLM app end to end, as real processes: debug trains and its loss falls, the run resumes exactly with
a frozen encoder, checkpoints record what each dataset gave, eval and generate read the checkpoint, bad
input exits 2 before the log dir exists, and two ranks train a frozen encoder under DDP and FSDP."""

import json

import numpy as np
import pytest
import torch

from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import assert_bad_input, crash_after, losses, run_module

pytest.importorskip("sklearn")
CONFIG = "config=src/apps/vlm/configs/debug.yaml"
TINY = ["model.dim=32", "vision.dim=16", "data.batch_size=16", "evaluation.samples=12", "evaluation.period=0"]
FROZEN = "optim.groups={vision.: 0.0, projector.: 2.0}"


def train(log_dir, *args, nproc: int = 1):
    out = run_module("src.apps.vlm.train", CONFIG, f"orchestration.log_dir={log_dir}", *args, nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def final_weights(log_dir) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(log_dir / "checkpoints")[-1] / "model.pt", weights_only=True)


def init_weights(*args: str) -> dict[str, torch.Tensor]:
    from src.apps.vlm.train import TrainConfig, build_model
    from src.nanollama.config import load_config

    cfg = load_config(TrainConfig, [CONFIG, *args])
    return build_model(cfg, training=True, device=torch.device("cpu")).state_dict()


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("vlm") / "debug"
    train(log_dir, "optim.steps=80", "orchestration.checkpoint.period=40", "evaluation.samples=30")
    return log_dir


def test_debug_trains_its_loss_falls_and_its_checkpoints_record_the_data(debug_run):
    raw = read_jsonl(debug_run / "metrics" / "raw_0.jsonl")
    first, last = np.mean([r["loss"] for r in raw[:2]]), np.mean([r["loss"] for r in raw[-2:]])
    assert last < 0.6 * first, (first, last)
    assert {"tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "samples_per_s_per_device"} <= set(
        raw[0]
    )
    (ev,) = read_jsonl(debug_run / "metrics" / "eval_0.jsonl")
    assert {"loss", "accuracy", "accuracy_digit", "accuracy_even", "accuracy_plus_two", "text_loss"} <= set(
        ev
    )
    assert ev["n_samples"] == 30 and 0 <= ev["accuracy"] <= 1
    records = [
        json.loads((c / "data_0.json").read_text()) for c in list_checkpoints(debug_run / "checkpoints")
    ]
    assert [r["step"] for r in records] == [40, 80]
    for r in records:
        by_name = {s["name"]: s for s in r["sources"]}
        assert set(by_name) == {"digits", "text"} and by_name["digits"]["shard"] == "0/1"
        assert sum(s["samples"] for s in by_name.values()) == r["step"] * 32  # every sample drawn counted
    assert records[1]["sources"][0]["samples"] > records[0]["sources"][0]["samples"]
    log = (debug_run / "logs" / "rank_0.log").read_text()
    assert "data plan: digits:" in log and "epochs" in log


@pytest.mark.slow
def test_eval_and_generate_read_the_checkpoint(debug_run, tmp_path):
    out = run_module("src.apps.vlm.eval", f"config={debug_run}/config.yaml", "evaluation.samples=30")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy" in out.stdout and "digit=" in out.stdout
    (in_loop,) = [r for r in read_jsonl(debug_run / "metrics" / "eval_0.jsonl") if "checkpoint" not in r]
    (offline,) = [r for r in read_jsonl(debug_run / "metrics" / "eval_0.jsonl") if "checkpoint" in r]
    assert offline["accuracy"] == in_loop["accuracy"] and offline["loss"] == pytest.approx(in_loop["loss"])
    out = run_module("src.apps.vlm.generate", f"config={debug_run}/config.yaml", "dataset=digits", "index=4")
    assert out.returncode == 0 and "(reference: " in out.stdout, out.stderr[-2000:]
    from PIL import Image

    from src.apps.vlm.data import DigitsDataset

    png = tmp_path / "digit.png"
    Image.fromarray((DigitsDataset("valid", 0.2)[3].image * 255).astype(np.uint8)).resize((32, 32)).save(png)
    out = run_module(
        "src.apps.vlm.generate", f"config={debug_run}/config.yaml", f"image={png}", "prompt=Is it even?"
    )
    assert out.returncode == 0 and out.stdout.startswith("Is it even? -> "), out.stderr[-2000:]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = run_module("src.apps.vlm.generate", f"config={debug_run}/config.yaml", f"image={bad}", "prompt=x")
    assert_bad_input(out, "image: cannot read")


def test_resume_is_exact_with_a_frozen_encoder(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [
        *TINY,
        "optim.steps=8",
        "orchestration.checkpoint.period=4",
        "orchestration.logging.period=1",
        FROZEN,
    ]
    train(straight, *args)
    crash_after(straight, resumed, 4)
    train(resumed, *args)
    assert losses(resumed) == losses(straight)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = init_weights(*args)
    vision = [k for k in a if k.startswith("vision.")]
    assert vision and all(torch.equal(a[k], start[k]) for k in vision)  # frozen: bit-identical to init
    assert not torch.equal(a["projector.fc1.weight"], start["projector.fc1.weight"])
    log = (resumed / "logs" / "rank_0.log").read_text()
    assert "frozen: " in log and "training from step 4 to 8" in log


def test_the_run_lasts_the_epochs_of_a_named_dataset(tmp_path):
    from src.apps.vlm.data import TextDataset

    args = [*TINY, "data.datasets=[{name: prose, kind: text}]", "data.epochs_of=prose", "data.epochs=2"]
    train(tmp_path / "run", *args)
    steps = 2 * len(TextDataset("train")) // 16
    assert max(losses(tmp_path / "run")) == steps  # the last logged step
    assert f"training from step 0 to {steps}" in (tmp_path / "run" / "logs" / "rank_0.log").read_text()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data.seq_len=16"], "data.seq_len: 16 is too short"),
        (["optim.groups={visio.: 0.0}"], "prefix 'visio.'"),
    ],
)
def test_bad_input_exits_2_before_the_log_dir(tmp_path, args, needle):
    log_dir = tmp_path / "run"
    out = run_module("src.apps.vlm.train", CONFIG, f"orchestration.log_dir={log_dir}", *args)
    assert_bad_input(out, needle, log_dir)


@pytest.mark.parametrize(
    "args, key",
    [
        (["data.epochs_of=nope", "data.epochs=1"], "data.epochs_of"),
        (["vision.pretrained=/nonexistent/siglip"], "vision.pretrained"),
        (["vlm.pixel_shuffle=3"], "vlm.pixel_shuffle"),
        (["data.datasets=[{name: a, kind: video}]"], "kind"),
    ],
)
def test_bad_config_names_the_key(args, key):
    """The same checks in process (the exit-2 path is the one above): each names its key."""
    from src.apps.vlm.train import TrainConfig
    from src.nanollama.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, [CONFIG, *args])
    assert key in e.value.key


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_train_a_frozen_encoder(tmp_path, parallelism):
    args = [*TINY, "optim.steps=6", f"cluster.parallelism={parallelism}", FROZEN, "evaluation.samples=8"]
    log_dir = tmp_path / "run"
    train(log_dir, *args, nproc=2)
    weights, start = final_weights(log_dir), init_weights(*args)
    assert all(torch.equal(weights[k], start[k]) for k in weights if k.startswith("vision."))
    assert not torch.equal(weights["lm.output.weight"], start["lm.output.weight"])
    (ev,) = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert ev["n_samples"] == 8  # summed over both ranks' shares
    records = [
        json.loads((list_checkpoints(log_dir / "checkpoints")[-1] / f"data_{r}.json").read_text())
        for r in (0, 1)
    ]
    assert [r["sources"][0]["shard"] for r in records] == ["0/2", "1/2"]


@pytest.mark.slow
def test_the_encoder_starts_from_siglip_and_the_lm_from_an_imported_llama(tmp_path):
    """vision.pretrained loads a Hugging Face SiglipVisionModel folder; init.checkpoint with a prefix map
    loads an imported HF Llama into `lm.`; frozen, both are still those weights after training."""
    transformers = pytest.importorskip("transformers")
    from src.nanollama.hf import import_hf
    from src.nanollama.model.vision import load_siglip

    torch.manual_seed(0)
    siglip = tmp_path / "siglip"
    vision_cfg = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    transformers.SiglipVisionModel(vision_cfg).save_pretrained(siglip)
    llama, imported = tmp_path / "llama", tmp_path / "imported"
    llama_cfg = transformers.LlamaConfig(
        vocab_size=262, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(llama_cfg).save_pretrained(llama)
    import_hf(llama, imported)
    args = [
        *TINY,
        "model.ffn_dim=96",
        f"vision.pretrained={siglip}",
        f"init.checkpoint={imported}",
        'init.prefix_map={"": lm.}',
        "optim.groups={vision.: 0.0, lm.: 0.0}",
        "optim.steps=3",
    ]
    log_dir = tmp_path / "run"
    train(log_dir, *args)
    weights = final_weights(log_dir)
    _, siglip_state = load_siglip(siglip)
    assert all(torch.equal(weights[f"vision.{k}"], v) for k, v in siglip_state.items())
    llama_state = torch.load(imported / "model.pt", weights_only=True)
    assert all(torch.equal(weights[f"lm.{k}"], v) for k, v in llama_state.items())
    assert "initialised" in (log_dir / "logs" / "rank_0.log").read_text()
    out = run_module(
        "src.apps.vlm.train", CONFIG, f"orchestration.log_dir={tmp_path / 'bad'}", *args, "vision.dim=32"
    )
    assert_bad_input(out, "vision.dim: 32, but", tmp_path / "bad")
