"""The recipe's data: text turned into tokens, split into training and validation, and cut into batches.

- Text: by default the Python standard library's own source (its top-level ``*.py`` files, about 4.7 MB on
  CPython 3.11), which is on every machine that runs Python: no download. ``data.path`` names a text file or a
  directory (its files matching ``data.glob``, sorted by name).
- Tokens: bytes (256 token ids) by default; with ``data.tokenizer_dir`` the tokenizer of that LitGPT checkpoint
  directory (each file encoded separately, followed by the end-of-text token when the tokenizer has one).
- Split: the last ``data.val_fraction`` of the tokens is the validation split.
- Training batches (:class:`TrainSampler`): random windows of ``seq_length + 1`` tokens drawn by a seeded
  generator. Its state (the generator's state and the number of batches drawn) goes into checkpoints, so a
  resumed run draws exactly the batch the uninterrupted run would have drawn next.
- Validation batches (:func:`validation_batches`): fixed, evenly spaced windows of the validation split.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from lightning_thunder.recipes.errors import ConfigError, require_litgpt
from lightning_thunder.recipes.model import BYTE_VOCAB_SIZE

if TYPE_CHECKING:
    from lightning_thunder.recipes.config import DataConfig

__all__ = [
    "TextSource",
    "TokenData",
    "TrainSampler",
    "TokenWindows",
    "find_text",
    "load_tokens",
    "stdlib_source_dir",
    "validation_batches",
]

Batch = tuple[torch.Tensor, torch.Tensor]


def stdlib_source_dir() -> Path:
    """The directory of the Python standard library's source files."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class TextSource:
    """The files to read, in order, and a description of where they come from."""

    files: list[Path]
    description: str


def find_text(cfg: DataConfig) -> TextSource:
    """The files ``cfg`` names: the standard library's ``*.py`` (``path: null``), one file, or a directory's
    files matching ``glob``. Raises :class:`ConfigError` when there are none."""
    if cfg.path is None:
        root = stdlib_source_dir()
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        if not files:
            raise ConfigError(
                f"data.path=null reads the Python standard library's source, but {root} has no *.py files; "
                "give data.path=<a text file or directory>"
            )
        return TextSource(files, f"the Python standard library's source ({root}/*.py)")
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return TextSource([path], str(path))
    if path.is_dir():
        files = sorted(p for p in path.glob(cfg.glob) if p.is_file())
        if not files:
            raise ConfigError(
                f"data.path={cfg.path!r} holds no files matching data.glob={cfg.glob!r}; set data.glob to match "
                "your files (e.g. data.glob='**/*.md')"
            )
        return TextSource(files, f"{path}/{cfg.glob}")
    raise ConfigError(f"data.path={cfg.path!r} does not exist; give a text file, a directory, or null for the default")


def _read(files: list[Path], max_bytes: int | None) -> list[tuple[Path, bytes, bool]]:
    """``(file, its bytes, truncated)`` in order, stopping once ``max_bytes`` are read."""
    out, total = [], 0
    for path in files:
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) >= max_bytes:
            keep = max_bytes - total
            out.append((path, data[:keep], keep < len(data)))
            break
        out.append((path, data, False))
        total += len(data)
    return out


def _decode(path: Path, data: bytes, truncated: bool) -> str:
    for cut in range(4 if truncated else 1):  # a cut may split a multi-byte character: back off up to 3 bytes
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError as e:
            error = e
    raise ConfigError(
        f"{path} is not UTF-8 text ({error}); a LitGPT tokenizer (data.tokenizer_dir) needs text: remove the file "
        "or narrow data.glob"
    )


@dataclass
class TokenData:
    """Tokens of the training and validation splits (1-D tensors) and what made them."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    description: str


def _byte_tokens(pieces: list[tuple[Path, bytes, bool]]) -> torch.Tensor:
    data = b"".join(data for _, data, _ in pieces)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _tokenizer_tokens(pieces: list[tuple[Path, bytes, bool]], tokenizer_dir: str) -> tuple[torch.Tensor, int]:
    require_litgpt("data.tokenizer_dir (a LitGPT tokenizer)")
    from litgpt import Tokenizer

    directory = Path(tokenizer_dir).expanduser()
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(
            f"data.tokenizer_dir={tokenizer_dir!r} holds neither tokenizer.json nor tokenizer.model; give a LitGPT "
            "checkpoint directory (e.g. from `litgpt download <model> --tokenizer_only true`), or null for bytes"
        )
    tokenizer = Tokenizer(directory)
    eos = tokenizer.eos_id is not None
    chunks = [tokenizer.encode(_decode(p, d, t), bos=False, eos=eos).to(torch.int32) for p, d, t in pieces]
    tokens = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int32)
    return tokens, int(tokenizer.vocab_size)


def load_tokens(cfg: DataConfig) -> TokenData:
    """Read and tokenize the text ``cfg`` names and split it; raises :class:`ConfigError` naming the fix when it
    is too short for ``seq_length``."""
    source = find_text(cfg)
    pieces = _read(source.files, cfg.max_bytes)
    n_bytes = sum(len(d) for _, d, _ in pieces)
    if cfg.tokenizer_dir is None:
        tokens, vocab, how = _byte_tokens(pieces), BYTE_VOCAB_SIZE, "bytes"
    else:
        tokens, vocab = _tokenizer_tokens(pieces, cfg.tokenizer_dir)
        how = f"the LitGPT tokenizer of {cfg.tokenizer_dir}"
    n_val = int(len(tokens) * cfg.val_fraction)
    need = cfg.seq_length + 1
    if n_val < need or len(tokens) - n_val < need:
        raise ConfigError(
            f"{source.description} gives {len(tokens):,} tokens: too few for data.seq_length={cfg.seq_length} with "
            f"data.val_fraction={cfg.val_fraction} (each split needs at least {need}); give more text, a shorter "
            "data.seq_length or another data.val_fraction"
        )
    capped = ""
    if cfg.max_bytes is not None and n_bytes >= cfg.max_bytes:
        capped = f", capped at data.max_bytes={cfg.max_bytes:,}"
    description = (
        f"{n_bytes:,} bytes from {len(pieces)} of {len(source.files)} files of {source.description}{capped}; "
        f"tokens ({how}): {len(tokens) - n_val:,} train, {n_val:,} validation"
    )
    return TokenData(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :], vocab, description)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_length: int) -> Batch:
    index = starts[:, None] + torch.arange(seq_length + 1)
    windows = tokens[index].long()
    return windows[:, :-1], windows[:, 1:]


class TrainSampler:
    """Random training windows, the same on every rank; rank ``r`` keeps rows ``r * micro_batch_size`` onwards.

    Each call of :meth:`next_batch` draws ``micro_batch_size * world_size`` window starts from one generator
    seeded with ``seed``, so every rank advances the same generator and a checkpoint of rank 0's
    :meth:`state_dict` restores all of them.
    """

    def __init__(
        self, tokens: torch.Tensor, seq_length: int, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if len(tokens) < seq_length + 1:
            raise ValueError(f"{len(tokens)} tokens cannot hold a window of seq_length + 1 = {seq_length + 1}")
        self.tokens = tokens
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: Micro-batches drawn so far (on every rank).
        self.batches = 0

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank: ``(inputs, targets)``, int64, ``(micro_batch_size, seq_length)``."""
        high = len(self.tokens) - self.seq_length  # starts in [0, len - seq_length - 1]
        starts = torch.randint(high, (self.micro_batch_size * self.world_size,), generator=self.generator)
        self.batches += 1
        mine = starts[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return _windows(self.tokens, mine, self.seq_length)

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream of batches: the generator's state and the batches drawn."""
        return {"generator": self.generator.get_state(), "batches": self.batches, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken (the number of ranks may not change: the stream depends on it)."""
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"the checkpoint's data position was taken with {state['world_size']} ranks, this run has "
                f"{self.world_size}: resume with devices={state['world_size']}"
            )
        self.generator.set_state(state["generator"])
        self.batches = int(state["batches"])
        self.seed = int(state["seed"])


def validation_batches(
    tokens: torch.Tensor, seq_length: int, micro_batch_size: int, count: int, *, rank: int = 0, world_size: int = 1
) -> list[Batch]:
    """``count`` micro-batches of this rank from evenly spaced windows of ``tokens`` (the same every call)."""
    total = count * micro_batch_size * world_size
    starts = torch.linspace(0, len(tokens) - seq_length - 1, total).long().view(count, world_size, micro_batch_size)
    return [_windows(tokens, starts[i, rank], seq_length) for i in range(count)]


class TokenWindows(Dataset):
    """A map-style dataset of ``length`` windows ``(inputs, targets)`` at random starts fixed by ``seed``, for a
    ``DataLoader`` (e.g. under the Lightning Trainer)."""

    def __init__(self, tokens: torch.Tensor, seq_length: int, length: int, seed: int = 0) -> None:
        if len(tokens) < seq_length + 1:
            raise ValueError(f"{len(tokens)} tokens cannot hold a window of seq_length + 1 = {seq_length + 1}")
        self.tokens = tokens
        self.seq_length = seq_length
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(tokens) - seq_length, (length,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Batch:
        x, y = _windows(self.tokens, self.starts[index : index + 1], self.seq_length)
        return x[0], y[0]
