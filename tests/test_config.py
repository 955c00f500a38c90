"""Tests for largo.config: defaults, readable errors with key paths, path resolution, YAML round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from largo.config import (
    IMAGE_ENCODER_NAMES,
    Config,
    ConfigError,
    dump_config,
    load_config,
    validate_config,
)
from largo.models.zoo import IMAGE_ENCODERS


def minimal() -> dict[str, Any]:
    return {
        "data": {"train": "data.csv"},
        "inputs": [{"name": "x", "type": "number"}],
        "outputs": [{"name": "label", "type": "category"}],
    }


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return str(info.value)


def test_minimal_dict_gets_defaults():
    cfg = validate_config(minimal())
    assert isinstance(cfg, Config)
    assert cfg.name == "run"
    assert cfg.data.valid == 0.1 and cfg.data.test == 0.1
    assert cfg.train.optimizer.name == "adamw"
    assert cfg.train.schedule.name == "constant"
    assert cfg.train.early_stopping is None
    assert cfg.model.hidden == [128]
    assert cfg.inputs[0].normalization == "standard"
    assert cfg.inputs[0].source == "x"
    assert cfg.outputs[0].type == "category"


def test_unknown_key_names_its_path():
    data = minimal()
    data["train"] = {"optimzer": {"name": "adam"}}
    message = error_of(data)
    assert "train.optimzer" in message
    assert "unknown key" in message


def test_bad_literal_names_path_value_and_allowed():
    data = minimal()
    data["train"] = {"optimizer": {"name": "adamx"}}
    message = error_of(data)
    line = next(line for line in message.splitlines() if "train.optimizer.name" in line)
    assert "adamx" in line
    for allowed in ("sgd", "adam", "adamw"):
        assert f"'{allowed}'" in line


def test_bad_feature_type_lists_allowed_tags():
    data = minimal()
    data["inputs"].append({"name": "t", "type": "audio"})
    message = error_of(data)
    assert "inputs.1" in message and "text" in message and "audio" in message
    for tag in ("number", "category", "image"):
        assert tag in message
    data = minimal()
    data["outputs"] = [{"name": "y", "type": "image"}]  # images are inputs only
    line = next(line for line in error_of(data).splitlines() if "outputs.0" in line)
    assert "'number'" in line and "'category'" in line and "'image', " not in line


def test_wrong_type_names_path_and_value():
    data = minimal()
    data["train"] = {"epochs": "ten"}
    message = error_of(data)
    assert "train.epochs" in message
    assert "'ten'" in message


def test_out_of_range_fraction():
    data = minimal()
    data["data"]["valid"] = 1.5
    message = error_of(data)
    assert "data.valid" in message and "1.5" in message
    data["data"]["valid"] = 0.5  # the same key with a good value validates
    assert validate_config(data).data.valid == 0.5


def test_unknown_image_encoder_lists_the_zoo():
    data = minimal()
    data["inputs"].append({"name": "img", "type": "image", "encoder": "resnet9000"})
    message = error_of(data)
    assert "inputs.1.encoder" in message and "resnet9000" in message
    for name in IMAGE_ENCODERS:
        assert name in message
    data["inputs"][1]["encoder"] = next(iter(IMAGE_ENCODERS))
    assert set(IMAGE_ENCODER_NAMES) == set(IMAGE_ENCODERS)  # config's names are the zoo's, no more
    assert validate_config(data).inputs[1].encoder == next(iter(IMAGE_ENCODERS))


def test_early_stopping_metric_must_be_logged():
    data = minimal()
    data["train"] = {"early_stopping": {"metric": "valid.r2"}}  # r2 is a regression metric
    message = error_of(data)
    assert "train.early_stopping.metric" in message and "valid.r2" in message
    for metric in validate_config(minimal()).metric_names():
        assert metric in message
    data["train"] = {"early_stopping": {"metric": "valid.f1_macro"}}
    es = validate_config(data).train.early_stopping
    assert es is not None and not es.minimize
    data["train"] = {"early_stopping": {"metric": "valid.loss"}}
    assert validate_config(data).train.early_stopping.minimize


def test_metric_names_prefix_outputs_when_several():
    data = minimal()
    data["outputs"].append({"name": "price", "type": "number"})
    names = validate_config(data).metric_names()
    assert "valid.label.accuracy" in names and "valid.price.r2" in names
    assert "valid.accuracy" not in names


def test_duplicate_feature_names():
    data = minimal()
    data["inputs"].append({"name": "label", "type": "number"})
    message = error_of(data)
    assert "unique" in message and "label" in message


def test_several_problems_are_all_reported():
    data = minimal()
    data["train"] = {"epochs": 0, "batch_size": "big"}
    message = error_of(data)
    assert "train.epochs" in message and "train.batch_size" in message


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        validate_config(["not", "a", "dict"])  # type: ignore[arg-type]


def test_load_config_resolves_data_paths_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.csv").write_text("x,label\n1,a\n", encoding="utf-8")
    data = minimal()
    data["data"].update(train="data.csv", valid="more/valid.csv", test=0.2)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert Path(cfg.data.train) == folder / "data.csv"
    assert Path(cfg.data.valid) == folder / "more" / "valid.csv"  # resolved even before it exists
    assert cfg.data.test == 0.2
    absolute = str(tmp_path / "abs.csv")
    data["data"]["train"] = absolute
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_config(path).data.train == absolute


def test_load_config_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: x.csv}\ninputs: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    data = minimal()
    data["train"] = {"epochs": -1}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml") as info:
        load_config(path)
    assert "train.epochs" in str(info.value)


def test_dump_config_round_trip():
    data = minimal()
    data["inputs"].append(
        {
            "name": "img",
            "type": "image",
            "size": [28, 28],
            "channels": 3,
            "encoder": "mlp",
            "augment": {"flip": True, "crop": 2},
        }
    )
    data["outputs"].append({"name": "price", "type": "number", "loss": "huber"})
    data["model"] = {"hidden": [16, 8], "init": "xavier"}
    data["train"] = {
        "epochs": 3,
        "optimizer": {"name": "sgd", "nesterov": True, "betas": [0.8, 0.9]},
        "early_stopping": {"metric": "valid.label.f1_macro", "patience": 2},
    }
    cfg = validate_config(data)
    text = dump_config(cfg)
    dumped = yaml.safe_load(text)
    assert dumped["train"]["optimizer"]["momentum"] == 0.9  # every default is written out
    assert dumped["data"]["clean"]["strip_whitespace"] is True
    again = validate_config(dumped)
    assert again == cfg
    assert again.inputs[1].size == (28, 28)
    assert dump_config(again) == text


def test_apply_overrides_sets_nested_keys_and_list_items_and_names_bad_paths():
    from largo.config import apply_overrides

    data = {"train": {"epochs": 3}, "inputs": [{"name": "t", "tokenizer": {"kind": "bpe"}}]}
    apply_overrides(data, ["train.epochs=7", "inputs.0.tokenizer.kind=jieba", "train.optimizer.lr=0.0001"])
    assert data["train"] == {"epochs": 7, "optimizer": {"lr": 1e-4}}
    assert data["inputs"][0]["tokenizer"]["kind"] == "jieba"
    with pytest.raises(ConfigError, match="not an index of a list of 1"):
        apply_overrides(data, ["inputs.3.name=x"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(data, ["train.epochs"])
