"""The search half of the API (re-exported by `largo.api`): `largo tune` / `largo.tune()`, optuna trials
over config keys, pruned on the validation curve, then the best config trained into a bundle.

The config's `tune:` section names the space: config key paths as `--set` writes them
(`train.optimizer.lr`, `model.hidden`, `inputs.0.encoder.layers`) → a float / int range or a list of
choices. Every key is checked up front: its lowest and highest value (first and last choice) must
each give a valid config, so a typo fails before the first trial.

Each trial trains the config with its values on the SAME train / valid split (read, cleaned and split
once, so `data.*` keys are not tunable), reports the validation metric after every epoch, and the
pruner stops a trial whose curve falls below the median of the earlier trials at the same epoch. A
trial's value is the metric of the weights fit() keeps: its best epoch with early stopping, else its
last. Preprocessing is fitted once, unless a key changes it (a feature's tokenizer, normalization,
vocabulary …; not its encoder or augmentation): then per trial. Trials write no bundles; the study
is an optuna SQLite file in `runs/<name>/tune-<N>/`, so an interrupted search resumes where it
stopped (`resume=True`;
`tune.trials` counts every trial of the study). Beside it: tune.json (every trial, the best),
best.yaml (the config that reproduces the best trial) and history.png. Then `train()` runs best.yaml
into the run's next version (same seed and split: its validation score is the best trial's).

A seq2seq config (`task: seq2seq`) searches the same way on its pairs (read and split once), with its
tokenizer trained once per distinct `tokenizer:` section; a search over tokenizer keys is judged on
generated text (valid.chrf, valid.bleu), as a language model's is on bits per character.

Why optuna: TPE sampling, median pruning and a resumable SQLite study are what a search needs, kept
up by a wide user base; writing them by hand would be a worse copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from largo.api_seq2seq import as_seq2seq_config, seq2seq_trial
from largo.config import (
    Config,
    ConfigError,
    SearchDimension,
    TuneConfig,
    apply_overrides,
    lower_is_better,
    validate_config,
)
from largo.config_lm import LMConfig, validate_lm_config
from largo.config_seq2seq import Seq2SeqConfig, validate_seq2seq_config
from largo.data.pairs import load_pairs
from largo.deploy.metadata import read_json
from largo.evaluate.scoring import headline, score_outputs
from largo.models.build import build_model
from largo.train.checkpoint import seed_everything
from largo.train.distributed import group_rank_and_size, log
from largo.train.loop import fit
from largo.train.losses import make_loss_fn
from largo.train.prepare import augmenter, class_weights, encode_split, fit_processors, load_splits

FIXED_KEYS = ("data", "tune", "name", "runs_dir")  # what every trial must share


@dataclass
class StudyResult:
    """What a search found: every trial, the best one and the config that reproduces it."""

    metric: str
    direction: str
    trials: list[dict[str, Any]]  # number, state, value, params, epochs, seconds
    best: dict[str, Any] | None
    best_config: Config | LMConfig | Seq2SeqConfig | None
    folder: Path
    unit: str = "epochs"  # what a trial's length counts: epochs (a model), steps (a language model)


# ------------------------------------------------------------------------------------------- space


def with_values(cfg: Any, values: dict[str, Any], source: str = "tune trial") -> Any:
    """The config (a model's or a language model's) with each key path set to its value, validated:
    errors name the key."""
    data = cfg.model_dump(mode="json")
    if isinstance(cfg, LMConfig) and values.get("model.preset") is not None:
        from largo.config_lm import GPT_PRESETS  # the preset's sizes, unless the space sets them too

        for key in GPT_PRESETS.get(values["model.preset"], {}):
            data["model"].pop(key, None)
    try:
        data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--set", "tune.space:")) from None
    return validator(cfg)(data, source=source)


def validator(cfg: Any) -> Callable[..., Any]:
    """The validating function of a config's kind (a model's, a language model's, a seq2seq model's)."""
    if isinstance(cfg, LMConfig):
        return validate_lm_config
    return validate_seq2seq_config if isinstance(cfg, Seq2SeqConfig) else validate_config


def check_space(cfg: Any, tune: TuneConfig) -> None:
    """Every key is tunable and its extreme values give valid configs (ConfigError naming the key)."""
    if group_rank_and_size()[1] > 1:
        raise ConfigError("largo tune runs its trials in one process; start it without torchrun")
    if cfg.data.valid in (None, 0, 0.0):
        raise ConfigError("tune: needs a validation split to judge trials on; set data.valid")
    for key, dim in tune.space.items():
        section = key.split(".", 1)[0]
        if isinstance(cfg, LMConfig) and cfg.train.init_from and section in ("model", "tokenizer"):
            raise ConfigError(
                f"tune.space.{key}: a fine-tuning search (train.init_from) keeps the base model's "
                "architecture and tokenizer; tune train keys"
            )
        if section in FIXED_KEYS:
            raise ConfigError(
                f"tune.space.{key}: the {section} section is the same for every trial "
                "(one split judges them all); tune model, train, tokenizer or feature keys"
            )
        for value in extremes(dim):
            with_values(cfg, {key: value}, source=f"tune.space.{key} = {value!r}")  # names the key


def extremes(dim: SearchDimension) -> list[Any]:
    if dim.type == "choice":
        return [dim.choices[0], dim.choices[-1]] if dim.choices else []
    if dim.type == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


def suggest(trial: Any, key: str, dim: SearchDimension) -> Any:
    """The trial's value of one key. A choice is offered to optuna as its index, so any YAML value
    works and equal-looking ones (true and 1, [64] and "[64]") stay apart."""
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return dim.choices[trial.suggest_categorical(key, list(range(len(dim.choices))))]


def decoded(space: dict[str, SearchDimension], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored optuna parameters as config values (a choice's index → the choice)."""
    return {
        k: space[k].choices[v] if k in space and space[k].type == "choice" else v for k, v in params.items()
    }


class ProcessorCache:
    """Preprocessing fitted on the train split, reused by every trial whose features are configured
    the same (a feature's encoder can change its preprocessing too: n-grams, an LM's tokenizer), so
    a trial never reads preprocessing fitted for other settings. The last `size` are kept."""

    def __init__(self, train: Any, size: int = 4):
        self.train, self.size = train, size
        self.fitted: dict[str, dict] = {}

    def get(self, cfg: Config) -> dict:
        key = json.dumps([[f.model_dump(mode="json") for f in fs] for fs in (cfg.inputs, cfg.outputs)])
        if key not in self.fitted:
            if len(self.fitted) >= self.size:
                self.fitted.pop(next(iter(self.fitted)))
            self.fitted[key] = fit_processors(self.train, cfg)
        return self.fitted[key]


def objective_metric(cfg: Any, tune: TuneConfig) -> tuple[str, bool]:
    """(metric, minimize) the study optimizes. A language-model search over tokenizer keys is judged
    on bits per character: a loss per token does not compare across vocabularies."""
    es = getattr(cfg.train, "early_stopping", None)  # a language model has none
    tokenizers = isinstance(cfg, LMConfig) and any(k.startswith("tokenizer.") for k in tune.space)
    auto = "valid.bpc" if tokenizers else es.metric if es is not None else "valid.loss"
    metric = tune.metric if tune.metric != "auto" else auto
    if tokenizers and metric != "valid.bpc":
        raise ConfigError(
            f"tune.metric: {metric!r} is per token, and the space changes the tokenizer; use valid.bpc"
        )
    per_token = ("valid.loss", "valid.perplexity", "valid.token_accuracy")
    if (
        isinstance(cfg, Seq2SeqConfig)
        and metric in per_token
        and any(k.startswith("tokenizer.") for k in tune.space)
    ):
        raise ConfigError(
            f"tune.metric: {metric!r} is per token, and the space changes the tokenizer; use valid.chrf or "
            "valid.bleu (with train.eval_generate > 0)"
        )
    if not metric.startswith("valid."):
        raise ConfigError(f"tune.metric: {metric!r} is not a validation metric; trials are judged on valid.*")
    if tune.direction != "auto":
        return metric, tune.direction == "minimize"
    if es is not None and es.metric == metric:
        return metric, es.minimize  # its own mode, when one is set
    return metric, lower_is_better(metric)


# ------------------------------------------------------------------------------------------- trial


def train_trial(
    cfg: Config, tables: dict, processors: dict, on_epoch_end: Callable[[dict[str, float]], None]
) -> tuple[list[dict[str, float]], int | None]:
    """Fit one trial's model on the shared split (no files written); returns (history, best epoch)."""
    train = encode_split(tables["train"], cfg, processors, "train")
    valid = encode_split(tables["valid"], cfg, processors, "valid")
    seed_everything(cfg.train.seed)
    model = build_model(cfg, processors)
    if cfg.train.lora is not None:
        from largo.train.lora import add_lora

        model = add_lora(model, cfg.train.lora)

    def score_fn(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return headline(score_outputs(outputs, valid.targets, cfg.outputs, processors))

    loss_fn = make_loss_fn(cfg.outputs, class_weights(cfg, train, processors))
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn,
                 transform=augmenter(cfg, processors), on_epoch_end=on_epoch_end)  # fmt: skip
    return result.history, result.best_epoch


def lm_trial(cfg: LMConfig, on_eval: Callable[[dict[str, float]], None]) -> list[dict[str, float]]:
    """Pretrain (or, with train.init_from, fine-tune) one trial's language model, no files written; the
    corpus's tokenizer and token files are cached across trials as for any run. Returns its
    evaluation records."""
    from largo.api_lm import prepare_lm
    from largo.train.lm import pretrain_fit

    cfg, _, data, model, _ = prepare_lm(cfg)
    return pretrain_fit(model, data, cfg.train, cfg.model.context, on_eval=on_eval).history


def import_optuna() -> Any:
    """The optuna module, or an ImportError that says how to install it."""
    try:
        import optuna
    except ImportError as e:
        raise ImportError('largo tune needs the optuna package: pip install "largo[tune]"') from e
    return optuna


def run_study(cfg: Any, folder: Path, say: Callable[[str], None]) -> StudyResult:
    """Run (or continue) the study of `cfg.tune` in `folder` (`tune()` has checked the space); the best
    trial's config comes back."""
    optuna = import_optuna()

    tune = cfg.tune
    metric, minimize = objective_metric(cfg, tune)
    lm, seq2seq = isinstance(cfg, LMConfig), isinstance(cfg, Seq2SeqConfig)
    tables = processors = None
    if not lm:  # a language model's corpus is prepared (and cached) by each trial's pretrain
        tables, _ = load_pairs(cfg) if seq2seq else load_splits(cfg)
        if tables["valid"].num_rows == 0:
            raise ConfigError("tune: the validation split is empty; set data.valid")
        processors = {} if seq2seq else ProcessorCache(tables["train"])  # tokenizers, for seq2seq

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    # the last step no trial is pruned at (optuna prunes from n_warmup_steps on): warmup_epochs epochs, or
    # for a language model as many evaluations' optimizer steps
    warmup = tune.warmup_epochs * (cfg.train.eval_every if lm else 1)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=warmup + 1)
        if tune.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=cfg.name, storage=f"sqlite:///{folder / 'study.db'}", load_if_exists=True,
        direction="minimize" if minimize else "maximize", pruner=pruner,
    )  # fmt: skip
    for t in study.trials:  # a search killed mid-trial left it running; one process runs a study
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    # seeded past the trials already run: a resumed search proposes new values, not the first ones again
    seed = tune.seed + len(study.trials)
    study.sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)
        if tune.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )

    def objective(trial: Any) -> float:
        values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
        trial_cfg = with_values(cfg, values)
        trial_cfg = trial_cfg.model_copy(
            update={"train": trial_cfg.train.model_copy(update={"progress": False})}
        )
        t0 = time.perf_counter()

        reported: list[float] = []

        def report(record: dict[str, float]) -> None:
            value = record.get(metric)
            if value is None or not math.isfinite(value):
                return
            reported.append(value)  # a model's epoch, a language model's optimizer step
            trial.report(value, step=int(record["step"]) if lm else len(reported))
            if trial.should_prune():
                trial.set_user_attr("epochs", int(record["step" if lm else "epoch"]))
                raise optuna.TrialPruned(f"{metric} {value:.4g} at evaluation {len(reported)}")

        with contextlib.redirect_stderr(io.StringIO()):  # the trial's log lines: one line a trial instead
            if lm:
                history = lm_trial(trial_cfg, report)
                kept = history[-1] if history else {}  # the final weights' evaluation
                trial.set_user_attr("epochs", int(kept.get("step", 0)))
            else:
                if seq2seq:
                    history, best_epoch = seq2seq_trial(trial_cfg, tables, processors, report)
                else:
                    history, best_epoch = train_trial(trial_cfg, tables, processors.get(trial_cfg), report)
                kept = next((r for r in history if r["epoch"] == best_epoch), history[-1])
                trial.set_user_attr("epochs", len(history))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        value = kept.get(metric)
        return float(value) if value is not None and math.isfinite(value) else float("nan")  # nan: failed

    def show(study: Any, trial: Any) -> None:
        state = trial.state.name.lower()
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        params = ", ".join(f"{k}={_short(v)}" for k, v in decoded(tune.space, trial.params).items())
        say(f"trial {trial.number:>3}  {state:<9} {metric} {value:>8}  {params}")

    remaining = tune.trials - len([t for t in study.trials if t.state.is_finished()])
    if remaining > 0:
        # a combination of values the config refuses (heads that do not divide dim …) fails alone
        study.optimize(objective, n_trials=remaining, timeout=tune.timeout_s, callbacks=[show],
                       catch=(ConfigError,))  # fmt: skip
    return _result(study, cfg, metric, minimize, folder, "steps" if lm else "epochs")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _result(study: Any, cfg: Any, metric: str, minimize: bool, folder: Path, unit: str) -> StudyResult:
    optuna = import_optuna()

    trials = []
    for t in study.trials:
        trials.append({
            "number": t.number, "state": t.state.name.lower(), "value": t.value,
            "params": decoded(cfg.tune.space, t.params),
            "epochs": t.user_attrs.get("epochs"), "seconds": t.user_attrs.get("seconds"),
            "last": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
        })  # fmt: skip
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = best_config = None
    if done:
        top = min(done, key=lambda t: t.value) if minimize else max(done, key=lambda t: t.value)
        values = decoded(cfg.tune.space, top.params)
        best = {"number": top.number, "value": top.value, "values": values}
        best_config = with_values(cfg, values, source="the best trial's config")
    direction = "minimize" if minimize else "maximize"
    return StudyResult(metric, direction, trials, best, best_config, folder, unit)


# --------------------------------------------------------------------------------------------- api


@dataclass
class TuneResult:
    """A finished search: the study's trials and best values, and the bundle trained from them."""

    study: StudyResult
    path: Path | None  # the best config's bundle (None when retrain=False or no trial finished)
    metrics: dict[str, Any] | None

    def table(self) -> str:
        """The trials, best first, as `largo tune` prints them."""
        s = self.study
        done = [t for t in s.trials if t["state"] == "complete"]  # pruned ones carry a value too
        done.sort(key=lambda t: t["value"], reverse=s.direction == "maximize")
        rest = [t for t in s.trials if t["state"] != "complete"]
        keys = list(s.best["values"]) if s.best else sorted({k for t in s.trials for k in t["params"]})
        lines = [f"{'trial':>5} {'state':<9} {s.metric:>14} {s.unit:>6}  " + "  ".join(keys)]
        for t in done + rest:
            value = f"{t['value']:.4f}" if t["value"] is not None else "-"
            params = "  ".join(_short(t["params"].get(k, "-")) for k in keys)
            lines.append(f"{t['number']:>5} {t['state']:<9} {value:>14} {t['epochs'] or '-':>6}  {params}")
        counts = {
            state: sum(t["state"] == state for t in s.trials) for state in ("complete", "pruned", "fail")
        }
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        lines.append(f"{summary} of {len(s.trials)} trials" if summary else "no trials")
        if s.best:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in s.best["values"].items())
            lines.append(f"best: trial {s.best['number']}, {s.metric} {s.best['value']:.4f} ({shown})")
        return "\n".join(lines)


def _changes(a: Config, b: Config) -> list[str]:
    """Key paths where two configs differ, tune.trials and tune.timeout_s left out."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    x, y = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    free = {"tune.trials", "tune.timeout_s"}
    return sorted(k for k in set(x) | set(y) if k not in free and x.get(k) != y.get(k))


def tune_folder(runs_dir: str | Path, name: str, resume: bool) -> Path:
    """runs/<name>/tune-<N>: the next one, or with `resume` the newest (ConfigError if there is none)."""
    root = Path(runs_dir) / name
    numbers = sorted(int(p.name[5:]) for p in root.glob("tune-*") if p.name[5:].isdigit())
    if resume:
        if not numbers:
            raise ConfigError(f"nothing to resume: no search of {name!r} under {runs_dir} (tune-<N> folders)")
        return root / f"tune-{numbers[-1]}"
    return root / f"tune-{(numbers[-1] if numbers else 0) + 1}"


def as_any_config(
    config: Config | LMConfig | Seq2SeqConfig | dict | str | Path,
) -> Config | LMConfig | Seq2SeqConfig:
    """A model's Config, (`task: lm`) a language model's LMConfig or (`task: seq2seq`) a Seq2SeqConfig,
    from one of them, a dict or a YAML file."""
    from largo.api import _as_config
    from largo.api_lm import _as_lm_config
    from largo.config_lm import read_lm_yaml

    if isinstance(config, Config | LMConfig | Seq2SeqConfig):
        return config
    data = config if isinstance(config, dict) else read_lm_yaml(config)  # each loader reads the file itself
    if data.get("task") == "seq2seq":
        return as_seq2seq_config(config)
    return _as_lm_config(config) if is_lm_config(data) else _as_config(config)


def is_lm_config(data: dict[str, Any]) -> bool:
    """Whether a config dict is a language model's: `task: lm`, or a corpus (data.paths) and no inputs."""
    corpus = isinstance(data.get("data"), dict) and "paths" in data["data"]
    return data.get("task") == "lm" or (corpus and "inputs" not in data)


def tune(
    config: Config | LMConfig | Seq2SeqConfig | dict | str | Path,
    *,
    resume: bool = False,
    retrain: bool = True,
) -> TuneResult:
    """Search the config's `tune.space`, then train the best config into a bundle.

    Args:
        config: a Config, an LMConfig (`task: lm`: trials pretrain, judged on held-out loss) or a
            Seq2SeqConfig (`task: seq2seq`) with a `tune:` section, the same as a dict, or a YAML file.
        resume: continue the newest search of this config's name (its study, its remaining trials).
        retrain: train the best trial's config into the run's next version (a bundle) at the end.

    Returns:
        TuneResult: every trial, the best values, and the bundle's path and metrics.
    """
    from largo.api import pretrain, train
    from largo.config import dump_config
    from largo.config_lm import dump_lm_config
    from largo.config_seq2seq import dump_seq2seq_config
    from largo.evaluate.report import write_tune_plot

    cfg = as_any_config(config)
    lm = isinstance(cfg, LMConfig)
    dump = dump_lm_config if lm else dump_seq2seq_config if isinstance(cfg, Seq2SeqConfig) else dump_config
    import_optuna()
    if cfg.tune is None:
        raise ConfigError("tune: the config has no tune section (tune: {space: {KEY: {type, low, high}}})")
    check_space(cfg, cfg.tune)  # before any folder is made
    objective_metric(cfg, cfg.tune)
    folder = tune_folder(cfg.runs_dir, cfg.name, resume)
    if resume:  # the same search with a new total: only tune.trials and tune.timeout_s may change
        stored = as_any_config(folder / "config.yaml")
        changed = _changes(stored, cfg)
        if changed:
            raise ConfigError(
                f"resume: this config differs from the search in {folder} at {', '.join(changed)}; "
                "only tune.trials and tune.timeout_s may change (start a new search without --resume)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    log(f"search folder: {folder}")
    study = run_study(cfg, folder, log)
    record = {
        "metric": study.metric,
        "direction": study.direction,
        "best": study.best,
        "trials": study.trials,
    }
    if study.best_config is not None:
        (folder / "best.yaml").write_text(dump(study.best_config), encoding="utf-8")
    write_tune_plot(folder / "history.png", study.trials, study.metric, study.direction == "minimize")
    path = metrics = None
    earlier = read_json(folder / "tune.json")
    if (earlier.get("best") or {}).get("number") == (study.best or {}).get("number") and earlier.get(
        "bundle"
    ):
        path = Path(earlier["bundle"])  # a resumed search whose best trial already has its bundle
        metrics = read_json(path / "metrics.json") or None
        record["bundle"] = str(path)
    elif retrain and study.best_config is not None:
        result = (pretrain if lm else train)(study.best_config)
        path, metrics = result.path, result.metrics
        record["bundle"] = str(path)
        (path / "tune.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    (folder / "tune.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return TuneResult(study, path, metrics)
