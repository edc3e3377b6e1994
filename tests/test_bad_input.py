"""Bad input fails early, with exit code 2 and a message naming the file, line or setting:
damaged or missing models, hub ids without network, unreadable data files, presets that
are not YAML, settings that cannot work, a resume of the wrong kind of checkpoint, gold
answers the verifier cannot read and prompts longer than the model's context. Each case
also checks that no model weights were loaded (and, where that is the promise, not even
the tokenizer). Nothing here touches the network: HF_HUB_OFFLINE is set (conftest) and
the reachability probe is replaced where a test needs the hub to look unreachable."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from meml.cli import main
from meml.core import hub
from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.load import load_config, to_yaml
from meml.tasks.registry import build_task
from meml.train.session import open_workload

from conftest import tiny_overrides


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was caught")

    monkeypatch.setattr("meml.engines.model.load_policy", refuse)
    monkeypatch.setattr("meml.engines.model.load_tokenizer", refuse)


@pytest.fixture
def no_weights_load(monkeypatch):
    """The tokenizer may load (some checks need it), the weights may not."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the problem was caught")

    monkeypatch.setattr("meml.engines.model.load_policy", refuse)


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Online mode, but every TCP connection fails at once, as on a machine without network."""

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    hub.unreachable_reason.cache_clear()
    yield
    hub.unreachable_reason.cache_clear()


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything asks the hub (or its cache, or `datasets`) about a name."""

    def refuse(*args, **kwargs):
        raise AssertionError("a local path was looked up on the hub")

    monkeypatch.setattr(hub, "unreachable_reason", refuse)
    monkeypatch.setattr(hub, "cached_file", refuse)
    monkeypatch.setattr("datasets.load_dataset", refuse)


def _train(capsys, model, out: Path, **extra) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    code = main(["train", *tiny_overrides(model, out, **extra)])
    return code, capsys.readouterr().err, time.perf_counter() - t0


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _generic_data(root: Path, train: list[dict], test: list[dict] | None = None) -> Path:
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "test.jsonl", test if test is not None else train)
    return root


GENERIC = {"task.name": "generic", "task.options": "{}", "sft.enabled": "false"}
ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(1, 9)]


# ----------------------------------------------------------------------------- models


def test_hub_ids_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "openai/gsm8k"):
        assert not hub.looks_like_local_path(hub_id), hub_id
    for path in (
        "./model",
        "../m",
        "/abs/model",
        "~/models/x",
        "a/b/c",
        "model.gguf",
        "data/train.jsonl",
        "runs/sft-1",
        "my model",
        "C:\\models\\x",
        "data/{split}.jsonl",
    ):
        assert hub.looks_like_local_path(path), path


@pytest.mark.parametrize("name", ["./no/such/model", "runs/sft-typo", "~/no-such-dir/model"])
@pytest.mark.e2e
def test_a_missing_local_model_path_is_not_looked_up_on_the_hub(
    name, tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_load, no_hub
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **{"model.name_or_path": name})
    assert code == 2
    assert f"model.name_or_path='{name}': no such file or directory" in err
    assert "not looked up on the Hugging Face hub" in err


def _damaged_model(kind: str, tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """(the model path to configure, the file the message must name)"""
    if kind == "fake gguf":
        fake = tmp_path / "model.gguf"
        fake.write_text("this is not a GGUF file\n")
        return fake, str(fake)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if kind == "no weights":
        (model / "model.safetensors").unlink()
        return model, str(model)
    if kind == "truncated safetensors":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return model, str(weights)
    if kind == "broken config.json":
        config = model / "config.json"
        config.write_text(config.read_text()[:40])
        return model, f"{config}:"
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no weights", "has a config.json but no weights"),
        ("truncated safetensors", "not a readable safetensors file"),
        ("broken config.json", "not valid JSON"),
        ("fake gguf", "not a GGUF file"),
    ],
)
@pytest.mark.e2e
def test_a_damaged_model_is_an_error_naming_the_file_before_loading(
    kind, message, tiny_model_dir, tmp_path, capsys, no_model_load
):
    path, named = _damaged_model(kind, tiny_model_dir, tmp_path)
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **{"model.name_or_path": path})
    assert code == 2
    assert message in err and named in err


@pytest.mark.e2e
def test_a_model_directory_the_loader_rejects_is_a_model_load_error(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **{"model.name_or_path": model})
    assert code == 2
    assert f"could not load the tokenizer from {model}" in err


@pytest.mark.e2e
def test_lora_target_modules_the_model_lacks_are_a_model_load_error(tiny_model_dir, tmp_path, capsys):
    code, err, _ = _train(
        capsys,
        tiny_model_dir,
        tmp_path / "out",
        **{"model.lora.enabled": "true", "model.lora.target_modules": "[no_such_proj]"},
    )
    assert code == 2
    assert "error: model.lora: Target modules {'no_such_proj'} not found in the base model" in err
    assert "(model.lora.target_modules=['no_such_proj'])" in err


@pytest.mark.e2e
def test_an_uncached_hub_id_offline_fails_at_once(tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, seconds = _train(
        capsys, tiny_model_dir, tmp_path / "out", **{"model.name_or_path": "meml-tests/no-such-model"}
    )
    assert code == 2
    assert "model.name_or_path='meml-tests/no-such-model' is not a local path" in err
    assert "not in the Hugging Face cache while HF_HUB_OFFLINE is set" in err
    assert seconds < 20


@pytest.mark.e2e
def test_an_uncached_hub_id_without_network_fails_at_once(
    tiny_model_dir, tmp_path, capsys, no_model_load, hub_unreachable
):
    code, err, seconds = _train(
        capsys, tiny_model_dir, tmp_path / "out", **{"model.name_or_path": "meml-tests/no-such-model"}
    )
    assert code == 2
    assert "the Hugging Face hub (https://huggingface.co) cannot be reached" in err
    assert "Network is unreachable" in err
    assert seconds < 20


# ----------------------------------------------------------------------------- data files


@pytest.mark.e2e
def test_non_utf8_jsonl_names_the_file_and_line(tiny_model_dir, tmp_path, capsys, no_model_load):
    data = _generic_data(tmp_path / "data", ROWS)
    lines = (data / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"What", b"Wh\xe4t")  # latin-1, not UTF-8
    (data / "train.jsonl").write_bytes(b"".join(lines))
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": data})
    assert code == 2
    assert f"{data / 'train.jsonl'}:3: not UTF-8 text (byte 0xe4" in err
    # and with task.skip_invalid the line is skipped like any malformed row
    task = build_task(TaskConfig(name="generic", path=str(data), skip_invalid=True))
    assert len(task.load("train")) == len(ROWS) - 1 and task.skipped["train"] == 1


def test_non_utf8_json_and_csv_name_the_line(tmp_path):
    json_file = tmp_path / "rows.json"
    json_file.write_bytes(b'[\n {"question": "a", "answer": "1"},\n {"question": "\xff", "answer": "2"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{json_file}:3: not UTF-8 text")):
        build_task(TaskConfig(name="generic", path=str(json_file))).load("train")
    csv_file = tmp_path / "rows.csv"
    csv_file.write_bytes(b"question,answer\n" + b"what is 1+1?,2\n" * 2000 + b"caf\xe9,3\n")
    with pytest.raises(DataError, match=re.escape(f"{csv_file}:2002: not UTF-8 text")):
        build_task(TaskConfig(name="generic", path=str(csv_file))).load("train")


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    long_question = "How much is 2 + 2? " + "x" * (200 * 1024)
    path = tmp_path / "rows.csv"
    path.write_text(f'question,answer\n"{long_question}",4\nshort?,5\n', encoding="utf-8")
    examples = build_task(TaskConfig(name="generic", path=str(path))).load("train")
    assert [len(e.question) for e in examples] == [len(long_question.strip()), len("short?")]


@pytest.mark.e2e
def test_a_corrupt_parquet_file_names_the_file(tiny_model_dir, tmp_path, capsys, no_model_load):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), data / "train.parquet")
    good = (data / "train.parquet").read_bytes()
    (data / "train.parquet").write_bytes(good[: len(good) // 2])
    pq.write_table(pa.Table.from_pylist(ROWS), data / "test.parquet")
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": data})
    assert code == 2
    assert f"{data / 'train.parquet'}: not a readable parquet file" in err


@pytest.mark.e2e
def test_a_task_path_typo_is_not_looked_up_on_the_hub(
    tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_load, no_hub
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, err, seconds = _train(capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": "data/gsm8kk"})
    assert code == 2
    assert "task.path: data/gsm8kk does not exist (it reads as a local path" in err
    assert seconds < 20


@pytest.mark.e2e
def test_a_hub_dataset_without_network_fails_at_once(tiny_model_dir, tmp_path, capsys, no_model_load, hub_unreachable):
    code, err, seconds = _train(
        capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": "meml-tests/no-such-dataset"}
    )
    assert code == 2
    assert "task.path='meml-tests/no-such-dataset' is not a local path, and the Hugging Face hub" in err
    assert "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert seconds < 20


@pytest.mark.e2e
def test_an_uncached_hub_dataset_offline_is_a_data_error(tiny_model_dir, tmp_path, capsys, no_model_load):
    code, err, seconds = _train(
        capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": "meml-tests/no-such-dataset"}
    )
    assert code == 2
    assert "task.path='meml-tests/no-such-dataset': could not load split 'train' from the Hugging Face hub" in err
    assert seconds < 20


# ----------------------------------------------------------------------------- config and environment


def test_a_preset_with_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys, no_model_load):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  steps: 3\n  questions_per_step: [1, 2\nalgo:\n  loss: reinforce\n")
    assert main(["train", str(preset), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"config error: {re.escape(str(preset))}:4:\d+: not valid YAML", err)


@pytest.mark.e2e
def test_vllm_backend_without_vllm_fails_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_load
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **{"rollout.backend": "vllm"})
    assert code == 2
    assert "rollout.backend=vllm: the vllm package is not installed" in err


@pytest.mark.e2e
def test_vllm_backend_with_several_processes_fails_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_load
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a)
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **{"rollout.backend": "vllm"})
    assert code == 2
    assert "rollout.backend=vllm runs in single-process training only, and this run has WORLD_SIZE=2" in err


# ----------------------------------------------------------------------------- resume


class _Saved:
    """Stands in for a policy and tokenizer in save_checkpoint: writes what a full model or
    a LoRA adapter writes into checkpoints/*/model."""

    def __init__(self, lora: bool):
        self.lora = lora

    def save_pretrained(self, path, **kwargs):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name = "adapter_config.json" if self.lora else "config.json"
        (path / name).write_text("{}")


@pytest.mark.parametrize(
    ("saved_lora", "message"),
    [
        (False, "model.lora.enabled=true, but checkpoint .*rl-000001 holds a full fine-tune"),
        (True, "model.lora.enabled=false, but checkpoint .*rl-000001 holds a LoRA adapter"),
    ],
)
@pytest.mark.e2e
def test_resuming_a_checkpoint_of_the_other_kind_fails_before_the_model_loads(
    saved_lora, message, tiny_model_dir, tmp_path, capsys, no_model_load
):
    from meml.train import checkpoint as ckpt

    out = tmp_path / "run"
    saved_cfg = load_config(
        None, tiny_overrides(tiny_model_dir, out, **{"model.lora.enabled": str(saved_lora).lower()})
    )
    ckpt.save_checkpoint(out, "rl", 1, _Saved(saved_lora), _Saved(False), {"step": 1}, to_yaml(saved_cfg), keep_last=2)
    code = main(
        [
            "train",
            "--resume",
            *tiny_overrides(tiny_model_dir, out, **{"model.lora.enabled": str(not saved_lora).lower()}),
        ]
    )
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


# ----------------------------------------------------------------------------- data quality


@pytest.mark.e2e
def test_gold_answers_the_verifier_cannot_read_at_all_are_an_error(tiny_model_dir, tmp_path, capsys, no_model_load):
    rows = [{"question": f"Capital number {i}?", "answer": f"city {chr(97 + i)}"} for i in range(6)]
    data = _generic_data(tmp_path / "data", rows)
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **GENERIC, **{"task.path": data})
    assert code == 2
    assert "split 'train': the verifier cannot read 6 of 6 gold answers (100.0%)" in err
    assert "example 'data-train-0' with answer 'city a'" in err


def test_some_unreadable_gold_answers_are_a_warning(tmp_path, caplog):
    rows = [*ROWS, {"question": "Which city?", "answer": "Paris"}]
    data = _generic_data(tmp_path / "data", rows)
    cfg = load_config(
        None, [f"task.path={data}", "task.name=generic", "sft.enabled=false", f"output_dir={tmp_path / 'out'}"]
    )
    with caplog.at_level(logging.WARNING, logger="meml"):
        s = open_workload(cfg)
    assert len(s.train_examples) == len(rows)
    assert "the verifier cannot read 1 of 9 gold answers (11.1%), e.g. example 'data-train-8'" in caplog.text


@pytest.mark.e2e
def test_a_prompt_longer_than_the_models_context_is_an_error_before_the_weights_load(
    tiny_model_dir, tmp_path, capsys, no_weights_load
):
    rows = [*ROWS, {"question": "What is " + " + ".join(["1"] * 700) + "?", "answer": "700", "uid": "long-one"}]
    data = _generic_data(tmp_path / "data", [{**r, "uid": r.get("uid", f"r{i}")} for i, r in enumerate(rows)], ROWS)
    extra = {**GENERIC, "task.path": data, "task.options": "{id: uid}"}
    code, err, _ = _train(capsys, tiny_model_dir, tmp_path / "out", **extra)
    assert code == 2
    assert re.search(
        r"the prompt of example 'long-one' \(expert '\w+'\) has \d+ tokens; with rollout.max_new_tokens=12 "
        r"it needs \d+ positions, more than the model's context of 1024\. 1 example\(s\) are too long",
        err,
    )
