"""Config: presets, overrides, type checks, and errors that say how to fix them."""

import pytest

from meml.core.errors import ConfigError
from meml.core.load import list_presets, load_config, to_yaml


def test_defaults_run_the_embedded_default():
    cfg = load_config()
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.task.name == "arithmetic"
    assert len(cfg.experts) == 3
    assert cfg.sft.enabled and cfg.algo.iml.enabled and cfg.algo.hsft.enabled


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    load_config(preset)


def test_overrides_are_typed_and_nested():
    cfg = load_config("grpo", ["train.steps=7", "optim.lr=3e-6", "algo.iml.weight=0.5", "experts.0.name=solo"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-6)
    assert cfg.algo.iml.weight == 0.5 and cfg.experts[0].name == "solo"


def test_list_and_dict_overrides_replace_whole_values():
    cfg = load_config(
        None, ["experts=[{name: a, system_prompt: x}, {name: b, system_prompt: y}]", "task.options={difficulty: 3}"]
    )
    assert [e.name for e in cfg.experts] == ["a", "b"]
    assert cfg.task.options == {"difficulty": 3}


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="Did you mean: 'steps'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="Did you mean: 'iml'"):
        load_config(None, ["algo.imll.weight=1"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=abc"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "algo.loss=ppo_clipp",
            r"algo.loss='ppo_clipp' is not valid. Did you mean 'ppo_clip'\? "
            r"Choose one of: cispo, gspo, ppo_clip, reinforce",
        ),
        ("algo.aggregation=token", r"algo.aggregation='token'.*Choose one of: constant, seq_mean, token_mean"),
        ("rollout.backend=vlm", r"rollout.backend='vlm'.*Did you mean 'vllm'"),
        ("task.name=arithmetik", r"task.name='arithmetik'.*Did you mean 'arithmetic'"),
    ],
)
def test_bad_choice_names_the_field_and_suggests(override, message):
    """Settings naming an implementation are checked against its registry, the one list of
    names, before any model loads."""
    from meml.train.preflight import check_choices

    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message):
        check_choices(cfg)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="max_wrong"):
        load_config(None, ["algo.hsft.max_wrong=4", "rollout.num_generations_per_expert=4"])
    with pytest.raises(ConfigError, match="on-policy"):
        load_config(None, ["algo.ppo_epochs=2"])
    with pytest.raises(ConfigError, match="two experts"):
        load_config(None, ["experts=[{name: a, system_prompt: x}]"])


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="Did you mean 'grpo'"):
        load_config("grpoo")


def test_resolved_config_round_trips_through_yaml():
    import yaml

    from meml.core.load import from_dict

    cfg = load_config("dr_grpo", ["seed=5"])
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_config_typo_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import meml.engines.model

    def boom(*a, **k):
        raise AssertionError("model loading must not start")

    monkeypatch.setattr(meml.engines.model, "load_policy", boom)
    from meml.cli import main

    assert main(["train", "train.stepz=2", f"output_dir={tmp_path}"]) == 2
    assert "Did you mean: 'steps'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["optim.beta1=1.0"], r"optim.beta1=1.0 must be in \[0, 1\)"),
        (["optim.beta2=-0.5"], r"optim.beta2=-0.5 must be in \[0, 1\)"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
        (["model.lora.enabled=true", "model.lora.dropout=1.0"], r"model.lora.dropout=1.0 must be in \[0, 1\)"),
        (
            ["model.lora.enabled=true", "model.lora.target_modules=[]"],
            r"model.lora.target_modules=\[\] must be a non-empty list of module names",
        ),
        (
            ["model.lora.enabled=true", "model.lora.target_modules=['q_proj', ' ']"],
            "must be a non-empty list of module names",
        ),
        (["reward.timeout_s=0"], "reward.timeout_s=0.0 must be > 0"),
        (["task.max_train_examples=0"], "task.max_train_examples=0 must be >= 1, or null for no limit"),
        (["task.max_eval_examples=-2"], "task.max_eval_examples=-2 must be >= 1, or null for no limit"),
        (
            ["rollout.temperature=0"],
            r"rollout.temperature=0 decodes greedily.*G=rollout.num_generations_per_expert=4.*"
            r"every group would have zero reward variance and give no learning signal",
        ),
    ],
)
def test_settings_that_cannot_work_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_what_those_checks_still_allow():
    load_config(None, ["task.max_train_examples=null", "task.max_eval_examples=1", "optim.beta2=0.999"])
    load_config(None, ["rollout.temperature=0", "train.steps=0"])  # greedy is fine when nothing is trained
    load_config(
        None,
        [
            "rollout.temperature=0",
            "rollout.num_generations_per_expert=2",
            "algo.hsft.max_wrong=1",
            "algo.advantage_grouping=question",
        ],
    )  # the experts' answers differ within a question's group
    load_config(None, ["model.lora.target_modules=[]"])  # LoRA off: not used


def test_a_setting_that_cannot_work_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import meml.engines.model

    def boom(*a, **k):
        raise AssertionError("model loading must not start")

    monkeypatch.setattr(meml.engines.model, "load_policy", boom)
    monkeypatch.setattr(meml.engines.model, "load_tokenizer", boom)
    from meml.cli import main

    assert main(["train", "optim.beta2=1.5", f"output_dir={tmp_path}"]) == 2
    assert "config error: optim.beta2=1.5 must be in [0, 1)" in capsys.readouterr().err


def test_renamed_keys_still_work_with_a_warning(caplog, tmp_path):
    """`batch_size` meant three things in three sections; the old names remain aliases."""
    from meml.core.load import from_dict, to_dict

    with caplog.at_level("WARNING", logger="meml"):
        cfg = load_config(None, ["rollout.batch_size=12", "eval.batch_size=5", "sft.batch_size=3"])
    assert (cfg.rollout.sequences_per_generate, cfg.eval.questions_per_batch, cfg.sft.sequences_per_step) == (12, 5, 3)
    assert "'rollout.batch_size' is a deprecated name; use 'rollout.sequences_per_generate'" in caplog.text
    preset = tmp_path / "old.yaml"
    preset.write_text("sft:\n  batch_size: 7\n")
    assert load_config(str(preset)).sft.sequences_per_step == 7
    saved = to_dict(load_config())
    saved["eval"]["batch_size"] = (
        saved["eval"].pop("questions_per_batch") * 0 + 9
    )  # a config.yaml written before the rename
    assert from_dict(saved).eval.questions_per_batch == 9
