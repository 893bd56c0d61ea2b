"""Recipe data: the standard-library default, the user's files, a LitGPT tokenizer, and batches whose position
survives a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_thunder.recipes import ConfigError
from lightning_thunder.recipes.config import DataConfig
from lightning_thunder.recipes.data import (
    TokenWindows,
    TrainSampler,
    find_text,
    load_tokens,
    stdlib_source_dir,
    validation_batches,
)


def test_the_default_is_the_standard_library_as_bytes():
    data = load_tokens(DataConfig(seq_length=32, max_bytes=100_000, val_fraction=0.1))
    files = sorted(stdlib_source_dir().glob("*.py"))
    expected = b"".join(p.read_bytes() for p in files)[:100_000]
    assert data.vocab_size == 256 and data.train.dtype == torch.uint8
    assert len(data.train) == 90_000 and len(data.val) == 10_000
    assert bytes(torch.cat([data.train, data.val]).tolist()) == expected  # validation is the end of the text
    assert "Python standard library" in data.description and "capped at data.max_bytes=100,000" in data.description
    assert "90,000 train, 10,000 validation" in data.description


def test_user_files_and_directories(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n" * 20)
    (tmp_path / "a.txt").write_text("first file\n" * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("markdown\n" * 20)
    source = find_text(DataConfig(path=str(tmp_path)))
    assert [p.name for p in source.files] == ["a.txt", "b.txt"]  # data.glob='**/*.txt', sorted
    assert [p.name for p in find_text(DataConfig(path=str(tmp_path), glob="**/*.md")).files] == ["c.md"]
    data = load_tokens(DataConfig(path=str(tmp_path / "a.txt"), seq_length=8, val_fraction=0.25))
    assert bytes(torch.cat([data.train, data.val]).tolist()) == b"first file\n" * 20
    both = load_tokens(DataConfig(path=str(tmp_path), seq_length=8))
    assert bytes(torch.cat([both.train, both.val]).tolist()) == b"first file\n" * 20 + b"second file\n" * 20


def test_data_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path='.*missing' does not exist"):
        load_tokens(DataConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"holds no files matching data.glob='\*\*/\*.txt'; set data.glob"):
        load_tokens(DataConfig(path=str(tmp_path)))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ConfigError, match=r"gives 9 tokens: too few for data.seq_length=256"):
        load_tokens(DataConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data.tokenizer_dir=.* holds neither tokenizer.json nor tokenizer.model"):
        load_tokens(DataConfig(path=str(tmp_path), tokenizer_dir=str(tmp_path)))


def _tiny_tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat"]
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_litgpt_tokenizer_from_a_checkpoint_directory(tmp_path):
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    directory = _tiny_tokenizer_dir(tmp_path)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "1.txt").write_text("the cat sat on the mat " * 10)
    (texts / "2.txt").write_text("the dog sat " * 10)
    data = load_tokens(DataConfig(path=str(texts), tokenizer_dir=str(directory), seq_length=4, val_fraction=0.2))
    tokens = torch.cat([data.train, data.val]).tolist()
    assert data.vocab_size == 7 and f"LitGPT tokenizer of {directory}" in data.description
    # each file encoded, then the end-of-text token; unknown words map to <unk>
    assert tokens == [2, 3, 4, 5, 2, 6] * 10 + [0] + [2, 1, 4] * 10 + [0]


def test_training_batches_continue_exactly_from_a_saved_position():
    tokens = torch.arange(1000) % 251
    sampler = TrainSampler(tokens, seq_length=16, micro_batch_size=4, seed=7)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(2)]
    resumed = TrainSampler(tokens, seq_length=16, micro_batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert resumed.batches == 3
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(2)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert x.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    other_world = TrainSampler(tokens, seq_length=16, micro_batch_size=2, world_size=2, seed=7)
    with pytest.raises(ValueError, match=r"taken with 1 ranks, this run has 2: resume with devices=1"):
        other_world.load_state_dict(state)


def test_ranks_split_one_global_batch():
    tokens = torch.arange(5000) % 256
    whole = TrainSampler(tokens, 8, micro_batch_size=4, seed=3).next_batch()[0]
    parts = [TrainSampler(tokens, 8, micro_batch_size=2, rank=r, world_size=2, seed=3).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_validation_batches_are_fixed_and_differ_between_ranks():
    tokens = torch.arange(3000) % 256
    first = validation_batches(tokens, 8, micro_batch_size=2, count=3, rank=0, world_size=2)
    again = validation_batches(tokens, 8, micro_batch_size=2, count=3, rank=0, world_size=2)
    other = validation_batches(tokens, 8, micro_batch_size=2, count=3, rank=1, world_size=2)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_token_windows_dataset_for_the_trainer():
    windows = TokenWindows(torch.arange(500) % 256, seq_length=10, length=6, seed=0)
    x, y = windows[5]
    assert len(windows) == 6 and x.shape == (10,) and torch.equal(x[1:], y[:-1])
