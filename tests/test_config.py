import dataclasses

import pytest

from qlora_engine.cli import build_parser
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError


def test_defaults_round_trip_through_yaml(tmp_path):
    config = RunConfig(lora_r=8, data="x.jsonl")
    config.save(tmp_path / "run.yaml")
    assert RunConfig.load(tmp_path / "run.yaml") == config


def test_unknown_option_is_named_with_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(EngineError, match=r"run.yaml: unknown option\(s\) lora_rank"):
        RunConfig.load(tmp_path / "run.yaml")


def test_wrong_type_names_the_field():
    with pytest.raises(EngineError, match="micro_batch_size: expected int"):
        RunConfig.from_dict({"micro_batch_size": "four"})


def test_choice_outside_the_list_is_refused_with_the_choices():
    with pytest.raises(EngineError, match="optimizer: 'sgd' is not one of adamw"):
        RunConfig.from_dict({"optimizer": "sgd"})


def test_value_below_minimum_is_refused():
    with pytest.raises(EngineError, match="lora_r: 0 is below the minimum 1"):
        RunConfig.from_dict({"lora_r": 0})


def test_integer_is_accepted_where_a_float_is_expected():
    assert RunConfig.from_dict({"learning_rate": 1}).learning_rate == 1.0


def test_invalid_yaml_names_the_line(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_r: 8\nmodel: [unclosed\n")
    with pytest.raises(EngineError, match="run.yaml line"):
        RunConfig.load(tmp_path / "run.yaml")


def test_a_run_that_would_do_nothing_is_refused():
    with pytest.raises(EngineError, match="max_steps and epochs are both 0"):
        RunConfig.from_dict({"max_steps": 0, "epochs": 0})


def test_every_config_field_is_a_train_flag_with_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action for action in train._actions}
    for spec in dataclasses.fields(RunConfig):
        assert spec.name in flags, spec.name
        assert flags[spec.name].help.startswith(spec.metadata["help"])


def test_flags_override_yaml_values(tmp_path):
    from qlora_engine.cli import resolve_train_config

    (tmp_path / "run.yaml").write_text("lora_r: 8\nmax_steps: 10\n")
    args = build_parser().parse_args(["train", str(tmp_path / "run.yaml"), "--max-steps", "30",
                                      "--run-dir", str(tmp_path / "r"), "--no-gradient-checkpointing"])
    config, run_dir = resolve_train_config(args)
    assert (config.lora_r, config.max_steps, config.gradient_checkpointing) == (8, 30, False)
    assert run_dir == tmp_path / "r"
