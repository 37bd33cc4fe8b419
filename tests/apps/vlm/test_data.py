"""The VLM's data: digits held out by image, the processor on real digit images, shapes scenes that agree
with their answers, and rows whose masks select what they should."""

import numpy as np
import pytest
import torch

from src.apps.vlm.data import (
    CELLS,
    COLORS,
    DIGIT_TASKS,
    NUMBERS,
    SHAPE_TASKS,
    DigitsDataset,
    Processor,
    ProcessorConfig,
    RowBuilder,
    Sample,
    ShapesConfig,
    ShapesDataset,
    TextDataset,
    digits_split,
    load_digits_arrays,
)
from src.nanollama.config import ConfigError
from src.nanollama.data.text import ByteTokenizer

pytest.importorskip("sklearn")


def test_digits_are_held_out_by_image_whatever_the_seed():
    train, valid = digits_split("train", 0.2), digits_split("valid", 0.2)
    assert len(train) + len(valid) == 1797 and not set(train) & set(valid)
    assert len(valid) == round(1797 * 0.2)
    ds = DigitsDataset("valid", 0.2)
    assert len(ds) == 3 * len(valid)
    images, labels = load_digits_arrays()
    for i in (0, 1, 2, 301):  # three questions about the same image, then another image
        sample, j = ds[i], valid[i // 3]
        assert sample.task == DIGIT_TASKS[i % 3]
        np.testing.assert_array_equal(sample.image[:, :, 0], images[j])
    d = int(labels[valid[0]])
    assert [ds[k].answer for k in range(3)] == [NUMBERS[d], "yes" if d % 2 == 0 else "no", NUMBERS[d + 2]]


def test_processor_resizes_and_normalises_real_digits():
    image = DigitsDataset("train", 0.2)[0].image  # (8, 8, 3) in [0, 1]
    cfg = ProcessorConfig(resize="nearest", mean=[0.5, 0.4, 0.3], std=[0.5, 0.25, 0.2])
    x = Processor(cfg, 16)(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, (m, s) in enumerate(zip(cfg.mean, cfg.std)):  # nearest: each pixel becomes a 2x2 block
        expected = (torch.from_numpy(image[:, :, c]) - m) / s
        torch.testing.assert_close(x[c, ::2, ::2], expected)
        torch.testing.assert_close(x[c, 1::2, 1::2], expected)
    nearest = Processor(ProcessorConfig(resize="nearest"), 16)(image)
    smooth = Processor(ProcessorConfig(resize="bilinear"), 16)(image)
    assert smooth.shape == nearest.shape and not torch.allclose(smooth, nearest)  # the config's resize
    with pytest.raises(ConfigError, match="resize"):
        ProcessorConfig(resize="area").check()


def colours_in(canvas: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> (y, x) pixels of each colour present."""
    found = {}
    for name, rgb in COLORS.items():
        where = np.all(np.isclose(canvas, rgb), axis=-1)
        if where.any():
            found[name] = np.argwhere(where)
    return found


def test_shapes_scenes_agree_with_their_answers():
    ds = ShapesDataset("train", ShapesConfig(train_size=400))
    seen = set()
    for i in range(400):
        s = ds[i]
        colours = colours_in(s.image)
        seen.add(s.task)
        assert s.task == SHAPE_TASKS[i % 5]
        if s.task == "count":
            assert NUMBERS[len(colours)] == s.answer
        if s.task == "color":
            assert s.answer in colours
        if s.task == "where":  # the asked shape's pixels all lie in the answered cell
            size = s.image.shape[0] // 3
            cell = CELLS.index(s.answer)
            ys, xs = np.concatenate([p for p in colours.values()]).T
            in_cell = (ys // size == cell // 3) & (xs // size == cell % 3)
            assert in_cell.any()
    assert seen == set(SHAPE_TASKS)
    again = ShapesDataset("train", ShapesConfig(train_size=400))[17]
    np.testing.assert_array_equal(again.image, ds[17].image)  # a pure function of (seed, split, i)
    other = ShapesDataset("valid", ShapesConfig(valid_size=400))[17]
    assert not np.array_equal(other.image, ds[17].image) or other.prompt != ds[17].prompt


def rows(loss: str = "answer", seq_len: int = 48, image_tokens: int = 4) -> RowBuilder:
    return RowBuilder(ByteTokenizer(), Processor(ProcessorConfig(), 16), seq_len, image_tokens, loss)


def test_rows_mask_the_answer_the_prefix_and_the_image_slots():
    tok = ByteTokenizer()
    image = np.zeros((8, 8, 3), dtype=np.float32)
    sample = Sample(image, "Is it even?", "no", "even")
    batch = rows()([sample, Sample(None, "", "hello world", "text")])
    prompt = [tok.bos, *tok.encode("Is it even?")]
    k, answer = 4, tok.encode("no") + [tok.eos]
    assert batch.tokens.shape == (2, 49) and batch.images.shape == (2, 3, 16, 16)
    assert not batch.images[1].any()  # a blank for the text row: static shapes
    assert batch.splice_mask[0].tolist() == [True] * k + [False] * 44 and not batch.splice_mask[1].any()
    assert batch.prefix_len.tolist() == [k + len(prompt), 0]
    assert batch.tokens[0, k : k + len(prompt) + len(answer)].tolist() == prompt + answer
    targets = batch.tokens[0, 1:][batch.loss_mask[0]].tolist()
    assert targets == answer  # the answer and its eos, nothing else
    text_targets = batch.tokens[1, 1:][batch.loss_mask[1]].tolist()
    assert text_targets == tok.encode("hello world") + [tok.eos]
    all_text = rows(loss="text")([sample])
    assert batch.tokens[0, 1:][all_text.loss_mask[0]].tolist() == prompt[1:] + answer


def test_a_row_too_long_for_seq_len_names_the_key():
    with pytest.raises(ConfigError, match="seq_len"):
        rows(seq_len=12)(
            [Sample(np.zeros((8, 8, 3), np.float32), "What is this digit plus two?", "six", "x")]
        )


def test_text_rows_are_cut_to_fit():
    long = TextDataset("train")[0]
    batch = rows(seq_len=32)([long])
    assert batch.loss_mask[0].all() and batch.tokens[0, -1] == ByteTokenizer().eos
