"""`largo update NAME` for a seq2seq model: its pairs plus feedback corrections, fine-tuned, gated on chrF.

The classifier's steps (update.py) on a seq2seq bundle's terms:
1. the parent: its files verified, its data files unchanged since registration (the frozen splits
   depend on them)
2. data: the parent's splits re-created from its config, and the feedback POST /generate collected:
   each corrected generation (or one rated good) is a pair (its prompt as the source, the correction or
   the generated text as the target). A hash of the source text puts each pair, for good, in the
   train part or in the held-out slice (`holdout`; a source of the frozen test split is always held
   out); train pairs are repeated `feedback_weight` times
3. train: `finetune` starts from the parent's weights, `retrain` from fresh ones (both keep its
   tokenizer, so old and new read the same tokens), through the same `fit_pairs` as `largo train`:
   5 epochs by default (finetune) at the parent's learning rate × 0.3
4. old and new are scored on the frozen test split and the held-out feedback (beam-searched outputs:
   chrF by default, or bleu, exact_match, loss, perplexity); the gate compares them
5. the bundle (with update.json) is registered as `candidate` and promoted only when the gate passes
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pyarrow as pa

from largo.config_seq2seq import Seq2SeqConfig, validate_seq2seq_config
from largo.data.clean import clean_table
from largo.data.pairs import load_pairs
from largo.deploy.bundle import environment, new_run_dir
from largo.deploy.translator import Translator, write_seq2seq_bundle, write_seq2seq_start
from largo.lifecycle.feedback import lm_feedback_texts
from largo.lifecycle.registry import Registry, Version
from largo.lifecycle.update import (
    METRICS,
    RECORD,
    ConfigError,
    UpdateConfig,
    UpdateError,
    UpdateResult,
    check_data,
    in_holdout,
    judge,
    register_candidate,
    run_layout,
    update_run_config,
)
from largo.train.seq2seq import fit_pairs, new_model

DEFAULT_GATE = "chrf"


def gate_metric(upd: UpdateConfig) -> str:
    """The metric the gate compares: chrF unless the update names another that a text output has."""
    metric = DEFAULT_GATE if upd.gate.metric == "auto" else upd.gate.metric
    if metric not in METRICS["text"]:
        raise ConfigError(
            f"update.gate.metric: {metric!r} does not apply to a seq2seq model; allowed: "
            f"{', '.join(METRICS['text'])}"
        )
    return metric


def feedback_pairs(
    registry: Registry, name: str, cfg: Seq2SeqConfig, holdout: float, like: pa.Table, test: pa.Table
) -> tuple[dict[str, pa.Table], dict[str, list[str]], dict[str, int]]:
    """The feedback as train and held-out tables of pairs (columns and types of `like`, cleaned as the
    config cleans data), the feedback row ids behind each, and the counts of corrections, rated good,
    rated bad and left out.

    The held-out coin is tossed per source text (whitespace-normalized), not per generation, so a
    source corrected twice is never on both sides; a feedback pair whose source is in the frozen test
    split is held out too, so the test side of the gate never scores a pair the new model trained on.
    """
    texts, counts = lm_feedback_texts(registry, name)
    source, target = cfg.data.source, cfg.data.target
    test_sources = {_key(x) for x in test.column(source).to_pylist() if isinstance(x, str)}
    parts: dict[str, list[dict[str, Any]]] = {"train": [], "held_out": []}
    ids: dict[str, list[str]] = {"train": [], "held_out": []}
    counts["left out"] = 0
    for t in texts:
        if not t["prompt"].strip() or not t["completion"].strip():  # nothing to read or to learn
            counts["left out"] += 1
            continue
        key = _key(t["prompt"])
        part = "held_out" if key in test_sources or in_holdout(key, holdout) else "train"
        parts[part].append({source: t["prompt"], target: t["completion"]})
        ids[part] += t["feedback_ids"]
    tables = {}
    for k, rows in parts.items():
        columns = {c: pa.array([r[c] for r in rows], like.schema.field(c).type) for c in (source, target)}
        table = pa.table(columns)
        tables[k] = clean_table(table, inputs=[source], targets=[target], config=cfg.data.clean)[0]
    return tables, ids, counts


def _key(text: str) -> str:
    """A source as the holdout coin sees it: whitespace collapsed."""
    return " ".join(text.split())


def check_settings(upd: UpdateConfig, cfg: Seq2SeqConfig) -> str:
    """The update settings a seq2seq model cannot take (ConfigError naming the key); the gate's metric."""
    if upd.steps is not None:
        raise ConfigError("update.steps: a seq2seq model trains for update.epochs (passes over its pairs)")
    if upd.gate.output not in (None, cfg.data.target):
        raise ConfigError(
            f"update.gate.output: {upd.gate.output!r} is not an output; allowed: {cfg.data.target}"
        )
    return gate_metric(upd)


def update_seq2seq(registry: Registry, parent: Version, upd: UpdateConfig) -> UpdateResult:
    """Fine-tune (or retrain) a registered seq2seq model on its pairs plus feedback, compare, register,
    promote if the gate passes (see the module doc)."""
    # 1. the parent, its unchanged data, the gate's metric and where the next version goes
    registry.verify(parent)
    check_data(parent)
    runs, name = run_layout(parent)
    old = Translator.load(parent.path)
    cfg = old.config
    metric = check_settings(upd, cfg)

    # 2. data: the frozen splits and the feedback pairs
    tables, _ = load_pairs(cfg)
    columns = [cfg.data.source, cfg.data.target]
    train_part = tables["train"].select(columns)
    test = tables["test"] if tables["test"].num_rows else tables["valid"]
    fb, fb_ids, counts = feedback_pairs(registry, parent.name, cfg, upd.holdout, train_part, test)
    if not fb["train"].num_rows:
        raise UpdateError(
            f"{parent.name}: no feedback pairs to train on ({fb['held_out'].num_rows} held out, "
            f"{counts['rated bad']} generations only rated bad); collect corrections first (POST /feedback)"
        )
    if not fb["held_out"].num_rows:
        raise UpdateError(
            f"{parent.name}: no held-out feedback to judge a gain on ({fb['train'].num_rows} pairs, "
            f"update.holdout = {upd.holdout}); collect more feedback or raise update.holdout"
        )
    data = {
        "train": pa.concat_tables([train_part] + [fb["train"]] * upd.feedback_weight),
        "valid": tables["valid"].select(columns),
    }

    # 3. train the new version into the run's next folder (removed again if anything fails)
    run_cfg = update_run_config(cfg, upd, validate_seq2seq_config)
    run_dir = new_run_dir(runs, name)
    try:
        write_seq2seq_start(run_dir, run_cfg, old.tokenizer)
        start = old.model.state_dict() if upd.mode == "finetune" else None
        model = new_model(run_cfg, start)
        result = fit_pairs(model, old.tokenizer, run_cfg, data)
        new = Translator(run_dir, run_cfg, old.tokenizer, model.cpu())
        scores: dict[str, dict[str, Any]] = {}
        for part, table in (("test", test), ("feedback", fb["held_out"])):
            for side, translator in (("old", old), ("new", new)):
                scores.setdefault(part, {})[side] = translator.score(table, f"{part} ({side})")[0]
        verdict = judge(upd.gate, cfg.data.target, metric, scores)
        rows = {
            "test": test.num_rows,
            "train": data["train"].num_rows,
            "feedback_train": fb["train"].num_rows,
            "feedback_held_out": fb["held_out"].num_rows,
        }
        skipped = {"rated bad": counts["rated bad"], "empty source or target": counts["left out"]}
        metrics = {
            "name": run_cfg.name,
            "version": run_dir.name,
            "task": "seq2seq",
            "parent": parent.ref,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "train_time_s": result.train_time_s,
            "parameters": model.num_parameters(),
            "splits": rows,
            "seed": run_cfg.train.seed,
            "versions": environment(),
            "config": run_cfg.model_dump(mode="json"),
            "test": scores["test"]["new"],
            "feedback": scores["feedback"]["new"],
        }
        write_seq2seq_bundle(run_dir, model, metrics)
        record = {
            "parent": parent.ref,
            "mode": upd.mode,
            "config": upd.model_dump(mode="json"),
            "rows": rows,
            "skipped": skipped,
            "feedback_ids": fb_ids,
            "scores": scores,
            "gate": {"passed": verdict.passed, "reason": verdict.reason, "metric": metric},
        }
        (run_dir / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # 4. register as candidate, promote when the gate passes
    version, verdict = register_candidate(registry, parent, run_dir, fb_ids["train"], verdict)
    return UpdateResult(
        parent.name, parent.version, version.version, version.path, verdict.passed, verdict, scores, rows,
        skipped, upd.mode, units=("rows", "pairs"),
    )  # fmt: skip
