"""`largo tune`: an optuna search over config keys on the digits table, pruned, resumed, retrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(csv: Path, runs: Path, **tune: object) -> dict:
    return {
        "name": "digits",
        "runs_dir": str(runs),
        "data": {"train": str(csv), "valid": 0.2, "test": 0.2},
        "inputs": [{"name": f"p{j}", "type": "number"} for j in range(64)],
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [32]},
        "train": {"epochs": 4, "batch_size": 64, "progress": False},
        "tune": {
            "space": {
                "train.optimizer.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
                "model.hidden": {"type": "choice", "choices": [[16], [64, 32]]},
            },
            "metric": "valid.accuracy",
            "trials": 6,
            "sampler": "random",
            "startup_trials": 2,
            **tune,
        },
    }


def test_a_search_finds_the_best_trial_and_its_bundle_reproduces_it(digits_csv: Path, tmp_path: Path) -> None:
    result = largo.tune(_config(digits_csv, tmp_path / "runs"))
    study = result.study
    assert study.metric == "valid.accuracy" and study.direction == "maximize" and len(study.trials) == 6
    done = [t for t in study.trials if t["state"] == "complete"]
    assert done and study.best["value"] == max(t["value"] for t in done)
    best = next(t for t in study.trials if t["number"] == study.best["number"])
    assert study.best["values"]["train.optimizer.lr"] == best["params"]["train.optimizer.lr"]
    assert study.best["values"]["model.hidden"] in ([16], [64, 32])  # the choice decoded from its JSON
    lrs = [t["params"]["train.optimizer.lr"] for t in study.trials]
    assert all(1e-5 <= lr <= 3e-2 for lr in lrs) and len(set(lrs)) == 6
    # the retrained bundle: the best trial's config, same seed and split, so the same validation score
    assert result.path is not None and result.path.name == "v1"
    cfg = yaml.safe_load((result.path / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["train"]["optimizer"]["lr"] == pytest.approx(study.best["values"]["train.optimizer.lr"])
    assert cfg["model"]["hidden"] == study.best["values"]["model.hidden"]
    assert result.metrics["valid"]["label"]["accuracy"] == pytest.approx(study.best["value"], abs=1e-9)
    folder = study.folder
    assert folder.name == "tune-1" and (folder / "study.db").is_file() and (folder / "history.png").is_file()
    record = json.loads((folder / "tune.json").read_text(encoding="utf-8"))
    assert record["best"]["number"] == study.best["number"] and len(record["trials"]) == 6
    assert record["bundle"] == str(result.path)
    assert (
        yaml.safe_load((folder / "best.yaml").read_text(encoding="utf-8"))["model"]["hidden"]
        == cfg["model"]["hidden"]
    )
    table = result.table()
    assert table.splitlines()[1].split()[0] == str(study.best["number"])  # best first
    assert f"best: trial {study.best['number']}, valid.accuracy {study.best['value']:.4f}" in table

    # resumed with a larger total: the same study grows, the earlier trials kept
    grown = largo.tune(_config(digits_csv, tmp_path / "runs", trials=8), resume=True, retrain=False)
    assert grown.study.folder == folder and len(grown.study.trials) == 8
    assert [t["params"] for t in grown.study.trials[:6]] == [t["params"] for t in study.trials]
    first_lrs = {t["params"]["train.optimizer.lr"] for t in study.trials}
    assert not first_lrs & {t["params"]["train.optimizer.lr"] for t in grown.study.trials[6:]}  # new values
    # retrain=False: the bundle is the earlier one if the best trial did not change, else there is none
    same_best = grown.study.best["number"] == study.best["number"]
    assert grown.path == (result.path if same_best else None)
    other = _config(digits_csv, tmp_path / "runs", trials=9)
    other["tune"]["space"]["model.hidden"]["choices"] = [[8], [128]]
    with pytest.raises(ConfigError, match=r"resume: .*differs .* at tune.space.model.hidden.choices"):
        largo.tune(other, resume=True)


def test_the_median_pruner_stops_trials_that_fall_behind(digits_csv: Path, tmp_path: Path) -> None:
    cfg = _config(digits_csv, tmp_path / "runs", trials=7, startup_trials=2)
    cfg["train"]["epochs"] = 6
    cfg["tune"]["space"] = {"train.optimizer.lr": {"type": "choice", "choices": [1e-2, 1e-6, 1e-6, 1e-2]}}
    result = largo.tune(cfg, retrain=False)
    states = [t["state"] for t in result.study.trials]
    assert "pruned" in states, result.table()
    for t in result.study.trials:
        if t["state"] == "pruned":
            assert t["params"]["train.optimizer.lr"] == 1e-6 and t["epochs"] < 6  # stopped early
        else:
            assert t["epochs"] == 6
    assert result.study.best["values"]["train.optimizer.lr"] == 1e-2


def test_bad_search_settings_name_the_key(digits_csv: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for space, match in [
        (
            {"train.optimiser.lr": {"type": "float", "low": 0.1, "high": 0.2}},
            r"(?s)invalid tune.space.train.optimiser.lr = 0.1:.*train.optimiser: unknown key",
        ),
        (
            {"data.valid": {"type": "float", "low": 0.1, "high": 0.2}},
            r"tune.space.data.valid: the data section is the same for every trial",
        ),
        (
            {"train.epochs": {"type": "int", "low": 0, "high": 3}},
            r"(?s)invalid tune.space.train.epochs = 0:.*train.epochs: Input should be greater than or equal",
        ),
        (
            {"model.hidden": {"type": "choice", "choices": [[16], "wide"]}},
            r"(?s)invalid tune.space.model.hidden = 'wide':.*model.hidden",
        ),
    ]:
        cfg = _config(digits_csv, runs)
        cfg["tune"]["space"] = space
        with pytest.raises(ConfigError, match=match):
            largo.tune(cfg)
    cfg = _config(digits_csv, runs)
    cfg["tune"]["space"]["train.optimizer.lr"] = {"type": "float", "low": 0.1, "high": 0.01}
    with pytest.raises(ConfigError, match=r"tune.space.train.optimizer.lr.*low \(0.1\) must be below high"):
        largo.validate_config(cfg)
    cfg = _config(digits_csv, runs, metric="valid.r2")
    with pytest.raises(
        ConfigError, match=r"tune.metric: 'valid.r2' is not logged; allowed: .*valid.accuracy"
    ):
        largo.validate_config(cfg)
    with pytest.raises(ConfigError, match="nothing to resume"):
        largo.tune(_config(digits_csv, tmp_path / "empty"), resume=True)
    assert not runs.exists()  # every bad setting stopped before a search folder was made


def test_the_cli_runs_a_search(digits_csv: Path, tmp_path: Path) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(_config(digits_csv, tmp_path / "runs", trials=2)), encoding="utf-8")
    result = CliRunner().invoke(cli, ["tune", str(path), "--trials", "3", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert "of 3 trials" in result.output and "best: trial" in result.output
    assert (
        "search:" in result.output and "bundle:" in result.output and "test label: accuracy=" in result.output
    )
    plain = tmp_path / "plain.yaml"
    config = _config(digits_csv, tmp_path / "runs")
    del config["tune"]
    plain.write_text(yaml.safe_dump(config), encoding="utf-8")
    refused = CliRunner().invoke(cli, ["tune", str(plain)])
    assert refused.exit_code != 0 and "no tune section" in refused.output, refused.output


def test_preprocessing_is_refitted_for_each_distinct_feature_config(digits_csv: Path, tmp_path: Path) -> None:
    from largo.api_tune import ProcessorCache
    from largo.train.prepare import load_splits

    cfg = largo.validate_config(_config(digits_csv, tmp_path / "runs"))
    cache = ProcessorCache(load_splits(cfg)[0]["train"], size=2)
    first = cache.get(cfg)
    assert cache.get(cfg.model_copy(update={"model": cfg.model.model_copy(update={"hidden": [8]})})) is first
    data = cfg.model_dump(mode="json")
    data["inputs"][0]["normalization"] = "minmax"
    other = largo.validate_config(data)
    assert cache.get(other) is not first and cache.get(other) is cache.get(other)
    assert len(cache.fitted) == 2


def test_a_refused_combination_fails_alone_and_a_missing_optuna_is_named(
    digits_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    cfg = _config(digits_csv, tmp_path / "runs", trials=4)
    cfg["train"]["epochs"] = 1
    # the extremes (64, 32) are valid, 0 is not: those trials fail, the others run
    cfg["tune"]["space"] = {"train.batch_size": {"type": "choice", "choices": [64, 0, 0, 32]}}
    result = largo.tune(cfg, retrain=False)
    states = {t["params"]["train.batch_size"]: t["state"] for t in result.study.trials}
    assert states.get(0) in (None, "fail") and "complete" in states.values()
    assert all(t["state"] == "fail" for t in result.study.trials if t["params"]["train.batch_size"] == 0)
    assert result.study.best["values"]["train.batch_size"] in (64, 32)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails
    with pytest.raises(
        ImportError, match=r'largo tune needs the optuna package: pip install "largo\[tune\]"'
    ):
        largo.tune(cfg)


def test_a_language_model_search_pretrains_each_trial_and_its_bundle_reproduces_the_best(
    tmp_path: Path,
) -> None:
    from tests.lm_corpus import tiny_lm_config, write_corpus

    cfg = tiny_lm_config(write_corpus(tmp_path / "corpus", lines=1500), tmp_path / "runs", steps=30)
    cfg["train"] |= {"eval_every": 10, "checkpoint_every": 10}
    cfg["tune"] = {
        "space": {
            "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "model.dim": {"type": "choice", "choices": [16, 32]},
        },
        "trials": 3,
        "sampler": "random",
        "startup_trials": 1,
        "warmup_epochs": 1,
    }
    result = largo.tune(cfg)
    study = result.study
    assert study.metric == "valid.loss" and study.direction == "minimize" and study.unit == "steps"
    done = [t for t in study.trials if t["state"] == "complete"]
    assert len(study.trials) == 3 and done and study.best["value"] == min(t["value"] for t in done)
    assert all(t["epochs"] == 30 for t in done)  # steps reached
    # the bundle: the best trial's config pretrained again, the same held-out loss
    assert result.path is not None and (result.path / "tokenizer.json").is_file()
    bundle_cfg = yaml.safe_load((result.path / "config.yaml").read_text(encoding="utf-8"))
    assert bundle_cfg["model"]["dim"] == study.best["values"]["model.dim"]
    assert result.metrics["valid"]["lm"]["loss"] == pytest.approx(study.best["value"], abs=1e-9)
    assert f"{'steps':>6}" in result.table().splitlines()[0]
    with pytest.raises(
        ConfigError, match=r"tune.metric: 'valid.accuracy' is not logged; allowed: auto, valid.loss"
    ):
        largo.tune({**cfg, "tune": {**cfg["tune"], "metric": "valid.accuracy"}})


def test_a_fine_tuning_search_starts_every_trial_from_the_base_model(tmp_path: Path) -> None:
    from tests.lm_corpus import tiny_lm_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus", lines=1500)
    base = largo.pretrain(tiny_lm_config(corpus, tmp_path / "runs", steps=60))
    base_loss = base.metrics["valid"]["lm"]["loss"]
    cfg = tiny_lm_config(corpus, tmp_path / "runs", steps=10, init_from=str(base.path))
    cfg["train"] |= {"eval_every": 5, "checkpoint_every": 5}
    cfg["tune"] = {"space": {"train.optimizer.lr": {"type": "choice", "choices": [1e-7, 2e-7]}}, "trials": 2}
    result = largo.tune(cfg, retrain=False)
    values = [t["value"] for t in result.study.trials]
    # a near-zero learning rate keeps the base's held-out loss; from scratch it would be ~log(300) = 5.7
    assert all(abs(v - base_loss) < 0.01 for v in values), (values, base_loss)


def test_language_model_search_settings(tmp_path: Path) -> None:
    from largo.api_tune import check_space, objective_metric, with_values
    from largo.config_lm import validate_lm_config
    from tests.lm_corpus import tiny_lm_config

    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n", encoding="utf-8")
    base = tiny_lm_config(corpus, tmp_path / "runs")
    cfg = validate_lm_config(
        {**base, "tune": {"space": {"model.preset": {"type": "choice", "choices": ["gpt-1m"]}}}}
    )
    # a tuned preset sets its own sizes (the resolved config had written dim 32 out)
    assert (with_values(cfg, {"model.preset": "gpt-1m"}).model.dim, cfg.model.dim) == (128, 32)
    # a vocabulary search is judged on bits per character; a per-token loss is refused
    space = {"tokenizer.vocab_size": {"type": "choice", "choices": [300, 600]}}
    vocab = validate_lm_config({**base, "tune": {"space": space}})
    assert objective_metric(vocab, vocab.tune) == ("valid.bpc", True)
    strict = validate_lm_config({**base, "tune": {"space": space, "metric": "valid.loss"}})
    with pytest.raises(ConfigError, match="per token, and the space changes the tokenizer; use valid.bpc"):
        objective_metric(strict, strict.tune)
    # a fine-tuning search keeps the base's architecture and tokenizer
    fine = {**base, "train": {**base["train"], "init_from": str(tmp_path)}}
    for key in ("model.dropout", "tokenizer.vocab_size"):
        dim = {"type": "choice", "choices": [0.1, 0.2] if key == "model.dropout" else [300, 600]}
        tuned = validate_lm_config({**fine, "tune": {"space": {key: dim}}})
        with pytest.raises(ConfigError, match=f"tune.space.{key}: a fine-tuning search .* keeps the base"):
            check_space(tuned, tuned.tune)


def test_the_cli_runs_a_language_model_search_and_resumes_it(tmp_path: Path) -> None:
    from tests.lm_corpus import tiny_lm_config, write_corpus

    cfg = tiny_lm_config(write_corpus(tmp_path / "corpus", lines=1000), tmp_path / "runs", steps=10)
    cfg["train"] |= {"eval_every": 5, "checkpoint_every": 5}
    cfg["tune"] = {"space": {"train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    first = CliRunner().invoke(cli, ["tune", str(path), "--trials", "2", "--no-retrain"])
    assert first.exit_code == 0, first.output
    assert "valid.loss" in first.output and "steps" in first.output and "of 2 trials" in first.output
    again = CliRunner().invoke(cli, ["tune", str(path), "--trials", "3", "--resume"])
    assert again.exit_code == 0, again.output
    assert "of 3 trials" in again.output and "valid: loss=" in again.output and "bundle:" in again.output


def test_a_seq2seq_search_judges_trials_on_chrf_and_its_bundle_reproduces_the_best(tmp_path: Path) -> None:
    from largo.data.samples import write_number_pairs

    pairs = write_number_pairs(tmp_path / "pairs.tsv", n=500)
    cfg = {
        "task": "seq2seq",
        "name": "numbers",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"train": str(pairs), "source": "english", "target": "chinese", "valid": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 300, "max_source_length": 24, "max_target_length": 16},
        "model": {"dim": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "dropout": 0.0},
        "train": {"epochs": 2, "eval_generate": 20, "progress": False,
                  "early_stopping": {"metric": "valid.chrf", "patience": 3}},
        "decode": {"beams": 1},
        "tune": {"space": {"train.optimizer.lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
                           "tokenizer.vocab_size": {"type": "choice", "choices": [280, 300]}},
                 "trials": 2, "sampler": "random", "startup_trials": 1},
    }  # fmt: skip
    result = largo.tune(cfg)
    study = result.study
    assert study.metric == "valid.chrf" and study.direction == "maximize" and study.unit == "epochs"
    assert len(study.trials) == 2 and study.best["value"] == max(t["value"] for t in study.trials)
    # the best config trained again: the same validation chrF at its best epoch, its vocabulary
    best = next(r for r in result.metrics["history"] if r["epoch"] == result.metrics["best_epoch"])
    assert best["valid.chrf"] == pytest.approx(study.best["value"], abs=1e-9)
    bundle_cfg = yaml.safe_load((result.path / "config.yaml").read_text(encoding="utf-8"))
    assert bundle_cfg["tokenizer"]["vocab_size"] == study.best["values"]["tokenizer.vocab_size"]
    with pytest.raises(
        ConfigError, match=r"tune.metric: 'valid.accuracy' is not logged; allowed: valid.loss"
    ):
        largo.tune({**cfg, "tune": {**cfg["tune"], "metric": "valid.accuracy"}})
