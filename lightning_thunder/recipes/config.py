"""The recipe config: a typed schema (dataclasses) read by OmegaConf from a YAML file plus ``key=value`` overrides.

::

    cfg = load_config("examples/recipes/debug.yaml", ["train.max_steps=20", "out_dir=out/try"])
    cfg.train.max_steps      # 20

Every key has a type, a default and a help text (:func:`describe_schema` prints them). Unknown keys, values of
the wrong type, values outside their choices or range and inconsistent combinations raise :class:`ConfigError`
naming the key, the bad value and what is allowed. Nothing is dropped or replaced silently.
"""

# No `from __future__ import annotations`: OmegaConf reads these annotations at run time.
import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from lightning_thunder.recipes.errors import ConfigError
from lightning_thunder.recipes.plugins import PLUGINS, parse_plugins

__all__ = [
    "ACCELERATORS",
    "OPTIMIZERS",
    "PRECISIONS",
    "STRATEGIES",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RecipeConfig",
    "TrainConfig",
    "check_environment",
    "describe_schema",
    "load_config",
    "to_dict",
    "to_yaml",
]

#: ``strategy`` values: the Fabric strategies of :mod:`lightning_thunder.strategies`.
STRATEGIES = ("thunder", "thunder_ddp", "thunder_fsdp")
#: ``precision`` values (Lightning's precision settings).
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
#: ``accelerator`` values.
ACCELERATORS = ("auto", "cpu", "cuda")
#: ``optimizer.name`` values.
OPTIMIZERS = ("AdamW",)


def _key(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None,
         above: float | None = None, below: float | None = None, maximum: float | None = None) -> Any:
    """A schema field: its default (a callable makes a fresh default per instance), help text and limits
    (``minimum``: value >= minimum; ``above``: value > above; ``below``: value < below; ``maximum``: value <=
    maximum). Numbers must also be finite (no nan or inf)."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "above": above, "below": below,
                "maximum": maximum}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The LitGPT model: ``litgpt.Config.from_name(name, **overrides)``."""

    name: str = _key(MISSING, "a LitGPT model name for litgpt.Config.from_name, e.g. pythia-14m, Llama-3.2-1B")
    overrides: dict[str, Any] = _key(dict, "litgpt.Config fields to change, e.g. {n_layer: 4, vocab_size: 256}")


@dataclass
class DataConfig:
    """The text to train on and how it becomes tokens."""

    path: Optional[str] = _key(
        None, "a text file or a directory of them; null: the Python standard library's source (no download)"
    )
    glob: str = _key("**/*.txt", "which files of a directory `path` to read (sorted by name)")
    tokenizer_dir: Optional[str] = _key(
        None, "a LitGPT checkpoint directory whose tokenizer encodes the text; null: bytes (256 token ids)"
    )
    seq_length: int = _key(256, "tokens per training sequence (at most the model's block_size)", minimum=1)
    val_fraction: float = _key(
        0.05, "fraction of the tokens (the end of the text) held out for validation", above=0, below=1
    )
    max_bytes: Optional[int] = _key(None, "read at most this many bytes of text; null: all of it", minimum=1)


@dataclass
class OptimizerConfig:
    """The optimizer (the learning rate follows ``train.lr_warmup_steps`` and a cosine decay to ``train.min_lr``)."""

    name: str = _key("AdamW", "the optimizer", choices=OPTIMIZERS)
    lr: float = _key(3e-4, "peak learning rate, reached after the warmup", above=0)
    weight_decay: float = _key(0.1, "decoupled weight decay", minimum=0)
    betas: list[float] = _key(lambda: [0.9, 0.95], "AdamW's (beta1, beta2)")
    eps: float = _key(1e-8, "AdamW's epsilon", above=0)


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = _key(1000, "optimizer steps to train for (in total, counting those before a resume)", minimum=1)
    micro_batch_size: int = _key(8, "sequences per forward/backward on each device", minimum=1)
    global_batch_size: int = _key(
        8, "sequences per optimizer step over all devices: a multiple of micro_batch_size * devices "
        "(the rest is gradient accumulation)", minimum=1,
    )
    lr_warmup_steps: int = _key(100, "steps of linear learning-rate warmup from 0", minimum=0)
    min_lr: float = _key(3e-5, "learning rate at max_steps (cosine decay after the warmup)", minimum=0)
    max_norm: Optional[float] = _key(1.0, "clip the gradient norm to this; null: no clipping", above=0)
    log_interval: int = _key(10, "print and log the training loss every this many steps", minimum=1)
    save_interval: Optional[int] = _key(
        100, "save a checkpoint every this many steps (and always at the end); null: only at the end", minimum=1
    )
    seed: int = _key(42, "seed of the weights' initialization and of the order of training sequences", minimum=0,
                     maximum=2**32 - 1)


@dataclass
class EvalConfig:
    """Validation."""

    interval: int = _key(100, "compute the validation loss every this many steps", minimum=1)
    max_iters: int = _key(10, "validation batches (of train.micro_batch_size sequences per device)", minimum=1)
    final_validation: bool = _key(True, "also validate after the last step")


@dataclass
class RecipeConfig:
    """A training recipe: what ``lightning-thunder pretrain --config <file>`` reads."""

    model: ModelConfig = _key(ModelConfig, "the LitGPT model")
    data: DataConfig = _key(DataConfig, "the training text")
    strategy: str = _key("thunder", "the Fabric strategy", choices=STRATEGIES)
    plugins: list[Any] = _key(
        list, "extra features, in order: " + ", ".join(f"{name} ({what})" for name, what in PLUGINS.items())
        + "; an entry is a name or {name: {option: value}}"
    )
    accelerator: str = _key("auto", "where to train (auto: CUDA when available)", choices=ACCELERATORS)
    devices: int = _key(1, "devices (processes) on this machine", minimum=1)
    tensor_parallel_size: int = _key(
        1, "thunder_fsdp: consecutive devices that split each layer (tensor parallelism; FSDP over the rest); must "
        "divide devices", minimum=1,
    )
    precision: str = _key("32-true", "Lightning's precision setting", choices=PRECISIONS)
    optimizer: OptimizerConfig = _key(OptimizerConfig, "the optimizer")
    train: TrainConfig = _key(TrainConfig, "the training loop")
    eval: EvalConfig = _key(EvalConfig, "validation")
    out_dir: str = _key("out/recipe", "where config.yaml, checkpoints/, logs/ and summary.json go")
    resume: Any = _key(
        False, "false: start fresh (out_dir must hold no checkpoint); auto: continue from the latest checkpoint in "
        "out_dir if there is one; true: continue from it (it must exist); or the path of a checkpoint"
    )


# ------------------------------------------------------------------------------------------------ loading
def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, check_model: bool = True
) -> RecipeConfig:
    """Read a recipe: the schema's defaults, then the YAML file at ``path``, then the ``key=value`` overrides.

    Args:
        path: a YAML file (``None``: the defaults and the overrides only).
        overrides: OmegaConf dot-list entries, e.g. ``["train.max_steps=20", "plugins=[fp8]"]``.
        check_model: also check ``model`` against LitGPT (the name exists, the overrides are ``litgpt.Config``
            fields, ``data.seq_length`` fits ``block_size``); needs ``litgpt``.

    Raises:
        ConfigError: the message names the key, the bad value and the allowed values.
    """
    merged: DictConfig = OmegaConf.structured(RecipeConfig)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), f"in {path}")
    for entry in overrides:
        merged = _merge(merged, _parse_override(entry), f"in the override {entry!r}")
    try:
        cfg = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required: {_help(e.full_key)}") from None
    assert isinstance(cfg, RecipeConfig)
    _check_fields(cfg, "")
    _check_combinations(cfg)
    if check_model:
        from lightning_thunder.recipes.model import check_model as _check_model

        _check_model_overrides(cfg)
        _check_model(cfg)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"the config file {str(path)!r} does not exist (recipes are in examples/recipes/)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come as several exception types
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config keys, got a {type(loaded).__name__}")
    return loaded


def _parse_override(entry: str) -> DictConfig:
    key, sep, _ = entry.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"the override {entry!r} must be written key=value, e.g. train.max_steps=20")
    try:
        return OmegaConf.from_dotlist([entry])
    except OmegaConfBaseException as e:
        raise ConfigError(f"the override {entry!r} could not be parsed: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the YAML parser of values raises its own types
        raise ConfigError(
            f"the value of the override {entry!r} could not be parsed ({_first_line(e)}); inside lists and "
            "mappings put a space after each colon, e.g. plugins=[{fp8: {emulate: true}}]"
        ) from None


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    hints = typing.get_type_hints(RecipeConfig)
    for key in other:  # a section given as a scalar: OmegaConf's message would not name the key
        section = hints.get(str(key))
        if dataclasses.is_dataclass(section) and not isinstance(other[key], DictConfig):
            raise ConfigError(
                f"{key}={other[key]!r} ({source}) is not valid: expected {_describe_type(section)}"
            )
    try:
        merged = OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(str(e.full_key or e.key), source)) from None
    except ValidationError as e:
        key = str(e.full_key) if e.full_key else None
        if key is None:
            raise ConfigError(f"{source}: {_first_line(e)}") from None
        raise ConfigError(
            f"{key}={e.value!r} ({source}) is not valid: expected {_expected(key)}; {_help(key)}"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_first_line(e)}") from None
    assert isinstance(merged, DictConfig)
    return merged


# ------------------------------------------------------------------------------------------------ checks
def _check_fields(obj: Any, prefix: str) -> None:
    """Choices and ranges from the schema's metadata, recursively."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{key}.")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        minimum, above, below, maximum = (f.metadata.get(k) for k in ("minimum", "above", "below", "maximum"))
        allowed = [f"value >= {minimum}"] if minimum is not None else []
        allowed += [f"value > {above}"] if above is not None else []
        allowed += [f"value < {below}"] if below is not None else []
        allowed += [f"value <= {maximum}"] if maximum is not None else []
        if not math.isfinite(value):
            what = " and ".join(allowed) or "a finite number"
            raise ConfigError(f"{key}={value!r} is not a finite number; allowed: {what}")
        bad = (
            (minimum is not None and value < minimum)
            or (above is not None and value <= above)
            or (below is not None and value >= below)
            or (maximum is not None and value > maximum)
        )
        if bad:
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {' and '.join(allowed)}")


def _check_combinations(cfg: RecipeConfig) -> None:
    """What single keys cannot say: strategy vs devices, the batch sizes, the optimizer's betas, plugins, resume."""
    if cfg.strategy == "thunder" and cfg.devices != 1:
        raise ConfigError(
            f"devices={cfg.devices} with strategy='thunder', which runs on one device; use strategy=thunder_ddp or "
            "strategy=thunder_fsdp for several devices, or devices=1"
        )
    _check_tensor_parallel(cfg)
    data_parallel = cfg.devices // cfg.tensor_parallel_size  # ranks that read different sequences
    per_step = cfg.train.micro_batch_size * data_parallel
    if cfg.train.global_batch_size % per_step:
        over = (
            f"devices ({cfg.devices})" if cfg.tensor_parallel_size == 1
            else f"the data-parallel size (devices {cfg.devices} / tensor_parallel_size {cfg.tensor_parallel_size})"
        )
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of train.micro_batch_size "
            f"({cfg.train.micro_batch_size}) times {over} = {per_step}; e.g. "
            f"train.global_batch_size={max(per_step, cfg.train.global_batch_size // per_step * per_step)}"
        )
    betas = cfg.optimizer.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optimizer.betas={list(betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if cfg.train.min_lr > cfg.optimizer.lr:
        raise ConfigError(
            f"train.min_lr={cfg.train.min_lr} is above optimizer.lr={cfg.optimizer.lr}; the learning rate decays "
            "from optimizer.lr to train.min_lr"
        )
    parse_plugins(cfg.plugins)
    resume = cfg.resume
    if not (isinstance(resume, bool) or resume == "auto" or (isinstance(resume, str) and resume.strip())):
        raise ConfigError(
            f"resume={resume!r} is not allowed; allowed values: false, true, auto, or the path of a checkpoint"
        )


def _check_tensor_parallel(cfg: RecipeConfig) -> None:
    tp = cfg.tensor_parallel_size
    if tp > 1 and cfg.strategy != "thunder_fsdp":
        raise ConfigError(
            f"tensor_parallel_size={tp} with strategy={cfg.strategy!r}: tensor parallelism runs in "
            "strategy=thunder_fsdp (a data_parallel x tensor_parallel mesh); set strategy=thunder_fsdp or "
            "tensor_parallel_size=1"
        )
    if cfg.devices % tp:
        sizes = ", ".join(str(d) for d in range(1, cfg.devices + 1) if cfg.devices % d == 0)
        raise ConfigError(
            f"tensor_parallel_size={tp} does not divide devices={cfg.devices}: the devices form a (data_parallel x "
            f"tensor_parallel) mesh; allowed tensor_parallel_size values for devices={cfg.devices}: {sizes}"
        )


#: ``litgpt.Config`` fields that count something: integers >= 1 (what each counts, for the message).
_MODEL_COUNTS = {
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_embd": "the embedding width",
    "n_query_groups": "key/value heads",
    "head_size": "channels per head",
    "intermediate_size": "the MLP's hidden width",
    "block_size": "the longest sequence, in tokens",
    "vocab_size": "token ids",
    "padded_vocab_size": "rows of the embedding",
}


def _check_model_overrides(cfg: RecipeConfig) -> None:
    """What ``litgpt.Config`` would accept silently or refuse without a reason: counts below 1, non-finite numbers,
    a head count that does not divide the width (or a group count the head count)."""
    import dataclasses as dc

    from lightning_thunder.recipes.errors import require_litgpt

    overrides = dict(cfg.model.overrides)
    for key, value in overrides.items():
        if key in _MODEL_COUNTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"model.overrides.{key}={value!r} is out of range; allowed: an integer >= 1 ({_MODEL_COUNTS[key]})"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.overrides.{key}={value!r} is not a finite number")
    require_litgpt()
    from litgpt import Config
    from litgpt.config import name_to_config

    if cfg.model.name not in name_to_config:
        return  # check_model names the model and its close matches
    defaults = {f.name: f.default for f in dc.fields(Config) if f.default is not dc.MISSING}
    model = {**defaults, **name_to_config[cfg.model.name], **overrides}

    def source(key: str) -> str:
        return f"model.overrides.{key}" if key in overrides else f"{cfg.model.name}'s {key}"

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    n_embd, n_head, groups = model.get("n_embd"), model.get("n_head"), model.get("n_query_groups")
    if model.get("head_size") is None and isinstance(n_embd, int) and isinstance(n_head, int) and n_embd % n_head:
        key = "n_head" if "n_head" in overrides or "n_embd" not in overrides else "n_embd"
        raise ConfigError(
            f"{source(key)}={model[key]} does not fit: n_head ({n_head}, {source('n_head')}) must divide n_embd "
            f"({n_embd}, {source('n_embd')}), each head getting n_embd / n_head channels; allowed n_head: "
            f"{divisors(n_embd)}, or set model.overrides.head_size"
        )
    if isinstance(groups, int) and isinstance(n_head, int) and n_head % groups:
        raise ConfigError(
            f"{source('n_query_groups')}={groups} does not fit: it must divide n_head ({n_head}, {source('n_head')}), "
            f"each group of query heads sharing one key/value head; allowed: {divisors(n_head)}"
        )


def check_environment(cfg: RecipeConfig) -> None:
    """What the config asks of this machine, checked before a run starts (``load_config`` checks the config alone,
    so a GPU recipe still validates and prints on a laptop).

    Raises:
        ConfigError: CUDA asked for where there is none (or fewer devices than ``devices``), FP8 without FP8
            hardware (and without ``emulate``), ``precision=16-mixed`` on CPU (Lightning would run bf16-mixed),
            an ``out_dir`` that is a file or cannot be written.
    """
    import os

    import torch

    cuda = torch.cuda.is_available()
    if cfg.accelerator == "cuda" and not cuda:
        raise ConfigError(
            "accelerator='cuda', but this machine has no CUDA GPU (torch.cuda.is_available() is False); use "
            "accelerator=cpu, or accelerator=auto to use a GPU only where there is one"
        )
    on_cuda = cfg.accelerator == "cuda" or (cfg.accelerator == "auto" and cuda)
    if on_cuda and cfg.devices > torch.cuda.device_count():
        raise ConfigError(
            f"devices={cfg.devices}, but this machine has {torch.cuda.device_count()} CUDA GPU(s); use "
            f"devices<={torch.cuda.device_count()}"
        )
    where = "CUDA" if on_cuda else "CPU"
    if cfg.precision == "16-mixed" and not on_cuda:
        raise ConfigError(
            "precision='16-mixed' on CPU: fp16 autocast needs CUDA, and Lightning would run bf16-mixed instead; set "
            "precision=bf16-mixed (what would run), precision=32-true, or train on a GPU"
        )
    for entry in parse_plugins(cfg.plugins):
        if entry.name != "fp8" or entry.options.get("emulate"):
            continue
        capability = torch.cuda.get_device_capability() if on_cuda else None
        if capability is None or capability < (8, 9):
            found = "this run is on CPU" if capability is None else (
                f"this GPU has compute capability {capability[0]}.{capability[1]}"
            )
            raise ConfigError(
                f"plugins=[fp8] needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or more), but {found}; "
                "use plugins=[{fp8: {emulate: true}}] to run FP8's numerics emulated (slow), or remove fp8"
            )
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"out_dir={cfg.out_dir!r} is a file; out_dir must be a directory (it will hold config.yaml, checkpoints/, "
            "logs/ and summary.json): choose another path"
        )
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"out_dir={cfg.out_dir!r} cannot be written ({e.strerror or e}: {e.filename or out}); choose a directory "
            f"you can write to ({where} run)"
        ) from None


# ------------------------------------------------------------------------------------------------ schema help
def _schema_field(key: str) -> dataclasses.Field | None:
    """The schema field of a dotted key (``None`` for keys inside a mapping such as ``model.overrides``)."""
    cls: Any = RecipeConfig
    found = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        found = fields[part]
        cls = typing.get_type_hints(cls).get(part)
    return found


def _section(key: str) -> tuple[str, Any]:
    """The dataclass holding ``key`` and its prefix (``""`` for the top level)."""
    parts = key.split(".")[:-1]
    cls: Any = RecipeConfig
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return ".".join(parts), None
        cls = hints[part]
    return ".".join(parts), cls


def _unknown_key_message(key: str, source: str) -> str:
    prefix, cls = _section(key)
    if cls is None:
        return f"unknown config key {key!r} ({source}): {prefix!r} has no sub-keys"
    names = [f.name for f in dataclasses.fields(cls)]
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    where = f"under {prefix!r}" if prefix else "at the top level"
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return f"unknown config key {key!r} ({source}); allowed keys {where}: {', '.join(names)}{hint}"


def _help(key: str) -> str:
    f = _schema_field(key)
    return f.metadata.get("help", "") if f is not None else ""


def _expected(key: str) -> str:
    prefix, cls = _section(key)
    leaf = key.split(".")[-1]
    if cls is None:
        return "a valid value"
    hint = typing.get_type_hints(cls).get(leaf)
    return _describe_type(hint)


def _describe_type(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return "null or " + _describe_type(inner[0])
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    return "a valid value"


def describe_schema() -> str:
    """Every key with its type, default and help, as indented text (the CLI's ``--help`` shows it)."""
    lines: list[str] = []

    def visit(cls: Any, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                lines.append(f"{indent}{f.name}:  # {f.metadata['help']}")
                visit(hint, indent + "  ")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "(required)" if default is MISSING else _show(default)
            choices = f.metadata.get("choices")
            extra = f" [{' | '.join(map(str, choices))}]" if choices else ""
            lines.append(f"{indent}{f.name}: {shown}  # {f.metadata['help']}{extra}")

    visit(RecipeConfig, "")
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A default as it would be written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or any(c in value for c in "*:#{}[],&!|>'\"%@`")):
        return repr(value)
    return str(value)


def to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The config as plain Python containers (for checkpoints and JSON)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RecipeConfig) -> str:
    """The config as YAML, every key included (what ``out_dir/config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
