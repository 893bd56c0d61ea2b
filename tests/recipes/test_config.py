"""The recipe config: every recipe file validates, overrides apply, and errors name the key, the value and what is
allowed. Also the CLI's handling of them and the console-script declaration."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from lightning_thunder.recipes import ConfigError, describe_schema, load_config
from lightning_thunder.recipes.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"
DEBUG = RECIPES / "debug.yaml"

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")


def test_the_recipes_of_the_issue_are_there():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"debug", "tinyllama", "llama-3.2-1b", "llama-3.2-1b-fp8", "llama-fsdp-2gpu"} <= names


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_file_validates(path):
    cfg = load_config(path)  # includes the LitGPT model name, its overrides and seq_length <= block_size
    assert cfg.out_dir.startswith("out/")
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * cfg.devices) == 0


def test_recipes_use_the_strategies_and_plugins_they_promise():
    assert load_config(DEBUG).strategy == "thunder" and load_config(DEBUG).precision == "32-true"
    assert load_config(RECIPES / "llama-3.2-1b-fp8.yaml").plugins == ["fp8"]
    fsdp = load_config(RECIPES / "llama-fsdp-2gpu.yaml")
    assert (fsdp.strategy, fsdp.devices, fsdp.plugins) == ("thunder_fsdp", 2, ["activation_checkpointing"])


def test_dot_list_overrides_apply_in_order():
    cfg = load_config(DEBUG, [
        "train.max_steps=7", "train.max_steps=9", "model.overrides.n_layer=2", "plugins=[activation_checkpointing]",
        "resume=false", "data.path=null", "optimizer.betas=[0.8,0.9]", "train.save_interval=null", "out_dir=123",
    ])
    assert cfg.train.max_steps == 9
    assert cfg.model.overrides == {"vocab_size": 256, "padded_vocab_size": 256, "block_size": 256, "n_layer": 2}
    assert cfg.plugins == ["activation_checkpointing"]
    assert cfg.resume is False and cfg.data.path is None and cfg.train.save_interval is None
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.out_dir == "123"
    assert load_config(DEBUG, ["plugins=[{fp8: {emulate: true}}]"]).plugins == [{"fp8": {"emulate": True}}]


def test_defaults_only_need_a_model_name():
    cfg = load_config(None, ["model.name=pythia-14m", "model.overrides.vocab_size=256"])
    assert cfg.strategy == "thunder" and cfg.data.path is None
    with pytest.raises(ConfigError, match=r"model.name is required: a LitGPT model name"):
        load_config(None)


def test_unknown_key_in_the_file_names_it_and_the_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEBUG.read_text().replace("  max_steps: 300", "  max_step: 300"))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert f"unknown config key 'train.max_step' (in {bad})" in message
    assert "allowed keys under 'train': max_steps, micro_batch_size, global_batch_size" in message
    assert "did you mean 'train.max_steps'?" in message


def test_unknown_keys_in_overrides():
    with pytest.raises(ConfigError, match=r"unknown config key 'stratgy' \(in the override 'stratgy=thunder'\); "
                                          r"allowed keys at the top level: model, data, strategy, plugins.*"
                                          r"did you mean 'strategy'\?"):
        load_config(DEBUG, ["stratgy=thunder"])
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.every'.*allowed keys under 'eval': interval, "
                                          r"max_iters, final_validation"):
        load_config(DEBUG, ["eval.every=5"])


def test_bad_values_name_the_key_the_value_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"strategy='fsdp' is not allowed; allowed values: thunder, thunder_ddp, "
                                          r"thunder_fsdp"):
        load_config(DEBUG, ["strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"precision='bf16' is not allowed; allowed values: 32-true, bf16-mixed"):
        load_config(DEBUG, ["precision=bf16"])
    with pytest.raises(ConfigError, match=r"train.max_steps='many' \(in the override 'train.max_steps=many'\) is not "
                                          r"valid: expected an integer; optimizer steps to train for"):
        load_config(DEBUG, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train.save_interval='x' .* expected null or an integer"):
        load_config(DEBUG, ["train.save_interval=x"])
    with pytest.raises(ConfigError, match=r"train.max_steps=0 is out of range; allowed: value >= 1"):
        load_config(DEBUG, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.5 is out of range; allowed: value > 0 and value < 1"):
        load_config(DEBUG, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"optimizer.lr=0.0 is out of range; allowed: value > 0"):
        load_config(DEBUG, ["optimizer.lr=0"])


def test_overrides_must_be_key_value():
    with pytest.raises(ConfigError, match=r"the override 'train.max_steps' must be written key=value"):
        load_config(DEBUG, ["train.max_steps"])


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match=r"devices=2 with strategy='thunder', which runs on one device; use "
                                          r"strategy=thunder_ddp or strategy=thunder_fsdp"):
        load_config(DEBUG, ["devices=2"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=12 must be a multiple of train.micro_batch_size "
                                          r"\(8\) times devices \(1\) = 8"):
        load_config(DEBUG, ["train.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"optimizer.betas=\[0.9\] must be two numbers"):
        load_config(DEBUG, ["optimizer.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"train.min_lr=0.1 is above optimizer.lr=0.003"):
        load_config(DEBUG, ["train.min_lr=0.1"])


def test_model_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"model.name='pythia-14' is not a LitGPT model name .*close matches: "
                                          r".*pythia-14m"):
        load_config(DEBUG, ["model.name=pythia-14"])
    with pytest.raises(ConfigError, match=r"model.overrides.n_layers is not a litgpt.Config field; did you mean "
                                          r"'n_layer'\?"):
        load_config(DEBUG, ["model.overrides.n_layers=2"])
    with pytest.raises(ConfigError, match=r"data.seq_length=512 is longer than the model's block_size \(256\)"):
        load_config(DEBUG, ["data.seq_length=512"])
    with pytest.raises(ConfigError, match=r"the byte tokenizer .* needs a vocabulary of 256 token ids, but the "
                                          r"model's padded_vocab_size is 128"):
        load_config(DEBUG, ["model.overrides.vocab_size=128", "model.overrides.padded_vocab_size=128"])


@pytest.mark.parametrize(("entry", "message"), [
    ("plugins=[fp9]", r"plugins\[0\]='fp9' is not a recipe plugin; allowed names: fp8, activation_checkpointing"),
    ("plugins=[{fp8: 3}]", r"plugins\[0\]=\{'fp8': 3\}: the options of 'fp8' must be a mapping"),
    ("plugins=[activation_checkpointing,activation_checkpointing]", r"plugins\[1\]='activation_checkpointing' is "
                                                                    r"listed twice"),
    ("plugins=[{activation_checkpointing: {every: 2}}]", r"'activation_checkpointing' takes no options"),
    ("plugins=[3]", r"plugins\[0\]=3 is not allowed: an entry is a plugin name or a one-key mapping"),
])
def test_plugin_entries_are_validated(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, [entry])


def test_resume_values():
    assert load_config(DEBUG, ["resume=auto"]).resume == "auto"
    assert load_config(DEBUG, ["resume=true"]).resume is True
    assert load_config(DEBUG, ["resume=out/x/checkpoints/step-000002.ckpt"]).resume.endswith(".ckpt")
    with pytest.raises(ConfigError, match=r"resume=3 is not allowed; allowed values: false, true, auto, or the path"):
        load_config(DEBUG, ["resume=3"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"the config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of config keys"):
        load_config(listed)


def test_schema_description_lists_every_key():
    text = describe_schema()
    for key in ("name:", "overrides:", "tokenizer_dir:", "max_steps:", "micro_batch_size:", "global_batch_size:",
                "lr_warmup_steps:", "log_interval:", "save_interval:", "interval:", "out_dir:", "resume:"):
        assert f"\n  {key}" in text or f"\n{key}" in text, key
    assert "strategy: thunder  # the Fabric strategy [thunder | thunder_ddp | thunder_fsdp]" in text


def test_cli_prints_config_errors_without_a_traceback(capsys):
    assert main(["pretrain", "--config", str(DEBUG), "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.max_step'") and "Traceback" not in err


def test_cli_print_config_and_commands(capsys):
    assert main(["pretrain", "--config", str(DEBUG), "train.max_steps=5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "strategy: thunder" in out
    assert main(["train"]) == 2 and "unknown command 'train'; allowed commands: pretrain" in capsys.readouterr().err
    assert main([]) == 2 and main(["--help"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0 and "config keys (default  # help)" in capsys.readouterr().out


def test_console_script_is_declared_and_importable():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project supports 3.10)
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    target = re.search(r'^lightning-thunder = "([\w.]+:\w+)"', scripts, re.MULTILINE)
    assert target is not None, scripts
    module, _, name = target.group(1).partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_a_section_given_as_a_value_names_its_keys(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: pythia-14m\n")
    with pytest.raises(ConfigError, match=r"model='pythia-14m' \(in .*flat.yaml\) is not valid: expected a mapping "
                                          r"of name, overrides"):
        load_config(flat)
    with pytest.raises(ConfigError, match=r"train=3 \(in the override 'train=3'\) is not valid: expected a mapping "
                                          r"of max_steps, micro_batch_size"):
        load_config(DEBUG, ["train=3"])


def test_without_litgpt_the_cli_says_how_to_install_it(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "litgpt", None)  # `import litgpt` now raises ImportError
    assert main(["pretrain", "--config", str(DEBUG)]) == 2
    err = capsys.readouterr().err
    assert "need the `litgpt` package, which is not installed: pip install 'lightning-thunder-ext[litgpt]'" in err


@pytest.mark.parametrize(("override", "line"), [
    ("optimizer.lr=nan", "optimizer.lr=nan is not a finite number; allowed: value > 0"),
    ("optimizer.lr=inf", "optimizer.lr=inf is not a finite number; allowed: value > 0"),
    ("train.max_norm=nan", "train.max_norm=nan is not a finite number; allowed: value > 0"),
    ("data.val_fraction=nan", "data.val_fraction=nan is not a finite number; allowed: value > 0 and value < 1"),
    ("train.seed=-1", "train.seed=-1 is out of range; allowed: value >= 0 and value <= 4294967295"),
    ("model.overrides.n_layer=0", "model.overrides.n_layer=0 is out of range; allowed: an integer >= 1 (transformer "
                                  "blocks)"),
    ("model.overrides.n_head=3", "model.overrides.n_head=3 does not fit: n_head (3, model.overrides.n_head) must "
                                 "divide n_embd (128, pythia-14m's n_embd), each head getting n_embd / n_head "
                                 "channels; allowed n_head: 1, 2, 4, 8, 16, 32, 64, 128, or set "
                                 "model.overrides.head_size"),
    ("model.overrides.n_query_groups=3", "model.overrides.n_query_groups=3 does not fit: it must divide n_head (4, "
                                         "pythia-14m's n_head)"),
])
def test_values_a_config_must_not_accept_are_one_line_and_exit_code_2(override, line, capsys):
    assert main(["pretrain", "--config", str(DEBUG), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {line}") and err.count("\n") == 1, err


def _machine_error(tmp_path, capsys, *overrides: str) -> str:
    out_dir = tmp_path / "out"
    assert main(["pretrain", "--config", str(DEBUG), f"out_dir={out_dir}", "resume=false", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (out_dir / "config.yaml").exists()  # stopped before anything ran
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
def test_what_this_machine_cannot_run_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert "accelerator='cuda', but this machine has no CUDA GPU" in _machine_error(tmp_path, capsys,
                                                                                      "accelerator=cuda")
    err = _machine_error(tmp_path, capsys, "plugins=[fp8]")
    assert "plugins=[fp8] needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or more), but this run is " \
           "on CPU; use plugins=[{fp8: {emulate: true}}]" in err
    err = _machine_error(tmp_path, capsys, "precision=16-mixed")
    assert "precision='16-mixed' on CPU: fp16 autocast needs CUDA, and Lightning would run bf16-mixed instead; set " \
           "precision=bf16-mixed" in err


def test_an_out_dir_that_cannot_hold_the_run_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    err = _machine_error(tmp_path, capsys, f"out_dir={a_file}")
    assert f"out_dir='{a_file}' is a file; out_dir must be a directory" in err
    err = _machine_error(tmp_path, capsys, "out_dir=/proc/lightning-thunder-test")  # not writable, even as root
    assert "out_dir='/proc/lightning-thunder-test' cannot be written (" in err
