"""The sequence-to-sequence half of the Python API: train_seq2seq() and translate() (re-exported by
`largo.api`; `largo.train()` calls train_seq2seq for a config with `task: seq2seq`).

train_seq2seq() reads top to bottom through the stages: pairs (read → clean → split) → a shared
tokenizer fit on train → ids → encoder-decoder → the classifier's `fit()` (epochs, schedules, early
stopping, checkpoints and resume, DDP under torchrun) → test scores (token perplexity, and BLEU / chrF of
beam-searched outputs) → bundle.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largo.config_seq2seq import Seq2SeqConfig, load_seq2seq_config, validate_seq2seq_config
from largo.deploy.bundle import environment, run_folder
from largo.deploy.seq2seq_text import Seq2SeqText
from largo.deploy.translator import Translator
from largo.train.distributed import barrier, is_main_process, log, process_group

if TYPE_CHECKING:
    from largo.api import TrainResult  # imported where it is built: largo.api imports this module


def as_seq2seq_config(config: Seq2SeqConfig | dict | str | Path) -> Seq2SeqConfig:
    """A Seq2SeqConfig from itself, a dict or a YAML file path."""
    if isinstance(config, Seq2SeqConfig):
        return config
    if isinstance(config, dict):
        return validate_seq2seq_config(config)
    return load_seq2seq_config(config)


def train_seq2seq(
    config: Seq2SeqConfig | dict | str | Path, *, resume: bool | str | Path = False
) -> TrainResult:
    """Train an encoder-decoder on text pairs and write its bundle.

    Args:
        config: a Seq2SeqConfig, the same as a dict, or a YAML file path.
        resume: True to continue the newest unfinished run of this config's name, or a run folder.

    Returns:
        TrainResult with the bundle path, metrics (history; valid and test loss, perplexity, token
        accuracy, BLEU, chrF, exact match; sample outputs) and the report path.
    """
    cfg = as_seq2seq_config(config)
    with process_group(cfg.train.device):
        return _train(cfg, resume)


def _train(cfg: Seq2SeqConfig, resume: bool | str | Path) -> TrainResult:
    from tokenizers import Tokenizer

    from largo.api import TrainResult  # here: largo.api imports this module
    from largo.data.pair_text import literal_specials
    from largo.data.pairs import load_pairs, train_pair_tokenizer, truncated
    from largo.deploy.generator import TOKENIZER
    from largo.deploy.translator import write_seq2seq_bundle, write_seq2seq_start
    from largo.train.distributed import pick_device
    from largo.train.seq2seq import fit_pairs, new_model

    # 1. the run folder: a new version, or the unfinished one being resumed (with its own config)
    run_dir = run_folder(cfg.runs_dir, cfg.name, resume)
    if resume:
        cfg = load_seq2seq_config(run_dir / "config.yaml")
    log(f"run folder: {run_dir}")

    # 2. pairs: read → clean → split → the tokenizer fit on train (rank 0; the others read it); the
    # model's vocabulary size and context come from it, written into the run's config
    tables, cleaning = load_pairs(cfg)
    sizes = {name: t.num_rows for name, t in tables.items()}
    log("split sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    if not resume and is_main_process():
        tokenizer = train_pair_tokenizer(tables["train"], cfg)
        cfg = with_sizes(cfg, tokenizer)
        write_seq2seq_start(run_dir, cfg, tokenizer)
    barrier()
    if not resume and not is_main_process():
        cfg = load_seq2seq_config(run_dir / "config.yaml")  # with the vocabulary size rank 0 wrote
    if resume or not is_main_process():
        tokenizer = literal_specials(Tokenizer.from_file(str(run_dir / TOKENIZER)))

    # 3. the model, seeded, and 4. train (train/seq2seq.py: the objective and the per-epoch scores)
    model = new_model(cfg)
    checkpoints = run_dir / "checkpoints"
    result = fit_pairs(model, tokenizer, cfg, tables, checkpoint_dir=checkpoints, resume=bool(resume))

    # 5. scores on valid and test (token figures, then beam-searched outputs), and the bundle (rank 0)
    if not is_main_process():
        return TrainResult(run_dir, {"history": result.history}, run_dir / "report.html")
    # decoded where it trained (a GPU decodes the splits much faster), saved from the CPU
    translator = Translator(run_dir, cfg, tokenizer, model, device=pick_device(cfg.train.device))
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "version": run_dir.name,
        "task": "seq2seq",
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "train_time_s": result.train_time_s,
        "parameters": model.num_parameters(),
        "splits": sizes,
        "cleaning": cleaning,
        "truncated": {name: truncated(t, cfg, tokenizer) for name, t in tables.items()},
        "seed": cfg.train.seed,
        "versions": environment(),
        "config": cfg.model_dump(mode="json"),
    }
    for split in ("valid", "test"):
        if sizes[split]:
            log(f"{split}: decoding {sizes[split]} sources (beams {cfg.decode.beams})")
            metrics[split], metrics["examples"] = translator.score(tables[split], split)
    report = write_seq2seq_bundle(run_dir, model.cpu(), metrics)
    if not cfg.train.checkpoint.keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, metrics, report)


def with_sizes(cfg: Seq2SeqConfig, tokenizer: Any) -> Seq2SeqConfig:
    """The config with the model's vocabulary size (the tokenizer's) and context (the longest text)."""
    t = cfg.tokenizer
    context = max(t.max_source_length, t.max_target_length)
    sizes = {"vocab_size": tokenizer.get_vocab_size(), "context": context}
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=sizes)})


def seq2seq_trial(
    cfg: Seq2SeqConfig,
    tables: dict[str, Any],
    tokenizers: dict[str, Any],
    on_epoch_end: Callable[[dict[str, float]], None],
) -> tuple[list[dict[str, float]], int | None]:
    """Fit one `largo tune` trial on the shared split, no files written; returns (history, best epoch).
    The tokenizer is trained once per distinct `tokenizer:` section and kept in `tokenizers`."""
    import json

    from largo.data.pairs import train_pair_tokenizer
    from largo.train.seq2seq import fit_pairs, new_model

    key = json.dumps(cfg.tokenizer.model_dump(mode="json"))
    if key not in tokenizers:
        tokenizers[key] = train_pair_tokenizer(tables["train"], cfg)
    tokenizer = tokenizers[key]
    cfg = with_sizes(cfg, tokenizer)
    result = fit_pairs(new_model(cfg), tokenizer, cfg, tables, on_epoch_end=on_epoch_end)
    return result.history, result.best_epoch


def translate(bundle: str | Path | Seq2SeqText, texts: str | list[str], **options: Any) -> list[str]:
    """Translate (or summarize, or rewrite: whatever the pairs taught) texts with a seq2seq bundle.

    Args:
        bundle: a seq2seq bundle folder, or a loaded Translator (or OnnxTranslator).
        texts: one source text or a list of them.
        options: beams, length_penalty, max_new_tokens, batch_size (defaults: the bundle's `decode`).

    Returns:
        One output text per source, in order.
    """
    translator = bundle if isinstance(bundle, Seq2SeqText) else Translator.load(bundle)
    return translator.translate(texts, **options)


def predict_pairs(translator: Seq2SeqText, data: Any) -> list[dict[str, str]] | dict[str, str]:
    """Outputs for a file's source column, a list of texts, a text, or records with the source field:
    one `{"source": …, "output": …}` per source (one record in: one answer out, not a list)."""
    if isinstance(data, dict):
        return predict_pairs(translator, [data])[0]
    from largo.data.pairs import texts
    from largo.data.readers import DataError, read_table

    column = translator.config.data.source
    if isinstance(data, Path):
        table = read_table(data)
        if column not in table.column_names:
            raise DataError(f"{data}: no {column!r} column (the source this bundle reads)")
        sources = texts(table, column)
    elif isinstance(data, str):
        sources = [data]
    else:
        sources = [r.get(column) if isinstance(r, dict) else r for r in data]
        bad = next((i for i, s in enumerate(sources) if not isinstance(s, str)), None)
        if bad is not None:
            raise DataError(f"record {bad}: needs a text {column!r} (got {data[bad]!r})")
    return [{"source": s, "output": o} for s, o in zip(sources, translator.translate(sources), strict=True)]


def evaluate_pairs(translator: Translator, data: str | Path, report_dir: str | Path | None = None) -> dict:
    """Score a seq2seq bundle on a file of pairs: token loss and perplexity, and BLEU / chrF / exact
    match of its beam-searched outputs; writes metrics.json and report.html to report_dir.

    Returns:
        {"test": {target: metrics}, "rows": n, "cleaning": counts, "report": path}.
    """
    from largo.data.pairs import read_pairs
    from largo.data.readers import DataError
    from largo.evaluate.report import write_metrics_json, write_report

    cfg = translator.config
    table, counts = read_pairs(str(data), cfg)
    if table.num_rows == 0:
        raise DataError(f"{data}: no pairs to evaluate")
    scores, examples = translator.score(table, str(data))
    out_dir = Path(report_dir) if report_dir else translator.path / "evaluations" / Path(data).stem
    metrics = {
        "name": cfg.name,
        "version": translator.path.name,
        "task": "seq2seq",
        "test": scores,
        "splits": {"test": table.num_rows},
        "cleaning": {"test": counts},
        "data": str(data),
        "examples": examples,
    }
    write_metrics_json(out_dir, metrics)
    report = write_report(out_dir, metrics)
    return {"test": scores, "rows": table.num_rows, "cleaning": counts, "report": str(report)}
