"""`largo update NAME` on a language model: fine-tune the production LM on its feedback, gate it.

1. the parent: NAME's production version (its files verified) and its reference corpus: the corpus
   it was pretrained on, or, for a version an update made, the reference its update recorded. The
   reference's files must still hash as recorded: its held-out stream is what "no regression" is
   measured on
2. data: the feedback as texts to learn from, one per generation (corrections, and generations rated
   good; the rule of `largo feedback export`). A hash of the generation id puts each, for good, in
   the train part or in the held-out slice (`holdout`), as for a classifier
3. train: `pretrain` from the parent's weights and tokenizer (`train.init_from`) on the train texts
   (prompt + completion) written as a JSONL corpus under `<runs>/<name>/.feedback/`, repeated
   `feedback_weight` times, and as often as it takes to fill two context windows. `steps` (default:
   two passes over that corpus, 10 to 1000) at the parent's lr × 0.3 unless `lr` is given; the
   parent's LoRA settings, if it had any, are used again (saved merged). Nothing of the feedback
   corpus is held out of training: the held-out slice is the judge
4. old and new are scored, in fp32, on
   - the held-out feedback: the completion's mean token loss given its prompt (prompt tokens are
     context, not targets); the gain is old − new in nats (0.01 ≈ 1% lower perplexity)
   - the reference's held-out stream (its training windows if it holds nothing out): the mean token
     loss of the same windows for both; the regression is new − old
5. the bundle (with update.json: the reference, the scores, the verdict, the feedback ids) is
   registered as `candidate` and promoted to `production` only when the gate passes
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from largo.config import ConfigError
from largo.config_lm import CorpusConfig, LMConfig, validate_lm_config
from largo.data.corpus import EOT, prepare_corpus, special_id
from largo.deploy.generator import LMBundle, read_lm_bundle
from largo.lifecycle.feedback import lm_feedback_texts, write_jsonl
from largo.lifecycle.registry import Registry, Version, path_sha256
from largo.lifecycle.update import (
    CANDIDATE,
    RECORD,
    UpdateConfig,
    UpdateError,
    UpdateResult,
    in_holdout,
    judge,
)
from largo.models.gpt import GPT, IGNORE
from largo.train.lm import accumulation, evaluate_lm

OUTPUT = "text"  # the one output of a language model, as the scores and the gate name it
SECTIONS = ("held-out corpus", "feedback slice")  # what the comparison table calls "test", "feedback"


# ---------------------------------------------------------------------------------------- reference


def reference_of(parent: Version, config: LMConfig) -> dict[str, Any]:
    """{"data": an LM config's data section, "lineage": [{path, sha256}]}: the corpus whose held-out
    stream judges regressions; its files must hash as recorded."""
    record = parent.path / RECORD
    if record.is_file():  # an updated version: the reference its own update was judged on
        reference = json.loads(record.read_text(encoding="utf-8"))["reference"]
    else:
        lineage = [d for d in parent.lineage.get("data") or [] if d.get("split") == "corpus"]
        reference = {"data": config.data.model_dump(mode="json"), "lineage": lineage}
    if not reference["lineage"]:
        raise UpdateError(f"{parent.ref}: its lineage names no corpus files to measure a regression on")
    for d in reference["lineage"]:
        now = path_sha256(d["path"])
        if d["sha256"] is None or now != d["sha256"]:
            state = "is missing" if now is None else f"changed (sha256 {d['sha256']} → {now})"
            raise UpdateError(
                f"{parent.ref}: its reference corpus {d['path']} {state} since it was registered, so "
                "the held-out stream the update is judged on cannot be re-created; restore the file"
            )
    return reference


def reference_stream(parent: LMBundle, reference: dict[str, Any]) -> tuple[Any, str]:
    """The reference corpus's held-out token stream (tokenized with the parent's tokenizer, cached like
    any corpus), or its training stream when it holds nothing out; and which one it is."""
    data = {**reference["data"], "paths": [d["path"] for d in reference["lineage"]]}  # absolute paths
    cfg = parent.config.model_copy(update={"data": CorpusConfig.model_validate(data)})
    _, data = prepare_corpus(cfg, parent.tokenizer)
    return (
        (data.valid, "held out") if len(data.valid) >= 2 else (data.train, "training windows: none held out")
    )


# --------------------------------------------------------------------------------------------- score


@torch.no_grad()
def completion_loss(
    model: GPT, tokenizer: Tokenizer, texts: list[dict[str, Any]], batch: int = 16
) -> dict[str, Any] | None:
    """Mean token loss of each text's completion given its prompt (prompt tokens are context only; the
    longest are cut from the left to the model's context); None without a completion token."""
    context, eot = model.cfg.context, special_id(tokenizer, EOT)
    rows = []
    for t in texts:
        prompt = tokenizer.encode(t["prompt"], add_special_tokens=False).ids or [eot]
        completion = tokenizer.encode(t["completion"], add_special_tokens=False).ids
        if not completion:
            continue
        ids = (prompt + completion)[-(context + 1) :]
        scored = min(len(completion), len(ids) - 1)
        rows.append((ids[:-1], [IGNORE] * (len(ids) - 1 - scored) + ids[-scored:]))
    if not rows:
        return None
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch):
        chunk = rows[lo : lo + batch]
        width = max(len(x) for x, _ in chunk)  # right padding: causal attention never looks ahead
        x = torch.tensor([x + [0] * (width - len(x)) for x, _ in chunk], device=device)
        y = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in chunk], device=device)
        loss_sum, counted = model(x, y)
        total, count = total + float(loss_sum), count + int(counted)
    return _scores(total / count, count, len(rows))


def _scores(loss: float, tokens: int, rows: int) -> dict[str, Any]:
    perplexity = math.exp(min(loss, 50.0))
    return {OUTPUT: {"type": "lm", "loss": loss, "perplexity": perplexity, "tokens": tokens, "rows": rows}}


def stream_loss(model: GPT, tokens: Any, config: LMConfig) -> dict[str, Any] | None:
    """Mean token loss of the parent config's evaluation windows of a token stream (the same windows
    for every model)."""
    train = config.train
    context = model.cfg.context
    result = evaluate_lm(
        model, tokens, context, train.micro_batch, train.eval_batches, contextlib.nullcontext()
    )
    if result is None:
        return None
    windows = math.ceil(result["tokens"] / min(context, len(tokens) - 1))
    return _scores(result["loss"], result["tokens"], windows)


def score(model: GPT, tokenizer: Tokenizer, stream: Any, config: LMConfig, held_out: list[dict]) -> dict:
    """{"test": scores on the reference stream, "feedback": on the held-out feedback (None if empty)}."""
    model.float()
    return {
        "test": stream_loss(model, stream, config),
        "feedback": completion_loss(model, tokenizer, held_out),
    }


# --------------------------------------------------------------------------------------------- train


def corpus_copies(
    tokenizer: Tokenizer, texts: list[dict[str, Any]], context: int, weight: int
) -> tuple[int, int]:
    """(copies of the feedback texts in the corpus, tokens of one copy): `weight` copies, or more to fill
    two windows of context + 1 tokens."""
    eot = special_id(tokenizer, EOT)
    one = sum(
        len(e.ids) for e in tokenizer.encode_batch([t["text"] for t in texts], add_special_tokens=False)
    )
    one += len(texts) * (eot >= 0)  # each document ends with EOT in the token file
    return max(weight, math.ceil(2 * (context + 2) / max(1, one))), one


def finetune_config(parent: LMBundle, upd: UpdateConfig, corpus: Path, stream_tokens: int) -> LMConfig:
    """The parent's config, continued from its weights on the feedback corpus."""
    base = parent.config
    if upd.epochs is not None:
        raise ConfigError(
            "update.epochs: a language model trains for update.steps (optimizer steps), not epochs"
        )
    if upd.mode != "finetune":
        raise ConfigError(
            f"update.mode: {upd.mode!r} does not apply to a language model; allowed: finetune "
            "(pretrain a new one with `largo pretrain`, then `largo registry add` it)"
        )
    data = base.model_dump(mode="json")
    runs = parent.path.parent.parent
    data |= {"name": parent.path.parent.name, "runs_dir": str(runs)}
    data["data"] = {"paths": [str(corpus)], "text_field": "text", "encoding": "utf-8", "valid": 0.0,
                    "cache_dir": str(base.cache_dir.resolve())}  # fmt: skip
    train = data["train"]
    per_step = accumulation(base.train, base.model.context) * base.train.micro_batch * base.model.context
    steps = upd.steps or min(1000, max(10, math.ceil(2 * stream_tokens / per_step)))
    train |= {"steps": steps, "init_from": str(parent.path), "eval_every": steps, "keep_checkpoint": False}
    train["optimizer"]["lr"] = upd.lr or base.train.optimizer.lr * 0.3
    train["checkpoint_every"] = min(train["checkpoint_every"], steps)
    if train.get("lora"):
        train["lora"]["save"] = "merged"  # the registry holds full bundles
    return validate_lm_config(data, "update run config")


# ------------------------------------------------------------------------------------------- update


def update_lm(registry: Registry, parent: Version, upd: UpdateConfig) -> UpdateResult:
    """Fine-tune a registered language model on its feedback, compare, register, promote if the gate
    passes (see the module doc)."""
    from largo.api_lm import pretrain

    # 1. the parent and its reference corpus
    registry.verify(parent)
    if upd.gate.metric not in ("auto", "loss"):
        raise ConfigError(
            f"update.gate.metric: {upd.gate.metric!r} does not apply to a language model; allowed: auto, loss"
        )
    if upd.gate.output not in (None, OUTPUT):
        raise ConfigError(f"update.gate.output: {upd.gate.output!r} is not an output; allowed: {OUTPUT}")
    old = read_lm_bundle(parent.path)
    reference = reference_of(parent, old.config)
    stream, stream_kind = reference_stream(old, reference)

    # 2. the feedback, split for good into train and held-out texts
    texts, counts = lm_feedback_texts(registry, parent.name)
    train = [t for t in texts if not in_holdout(t["prediction_id"], upd.holdout)]
    held_out = [t for t in texts if in_holdout(t["prediction_id"], upd.holdout)]
    if not train:
        raise UpdateError(
            f"{parent.name}: no feedback texts to train on ({len(held_out)} held out; {counts['rated bad']} "
            "generations only rated bad); collect corrections or good ratings first (POST /feedback)"
        )
    copies, one = corpus_copies(old.tokenizer, train, old.config.model.context, upd.feedback_weight)
    lines = [{k: t[k] for k in ("text", "prompt", "completion", "kind", "prediction_id")} for t in train]
    corpus = write_jsonl(parent.path.parent / ".feedback" / f"{uuid.uuid4().hex}.jsonl", lines * copies)

    # 3. fine-tune into the run's next version folder (removed again if anything fails)
    run_cfg = finetune_config(old, upd, corpus, copies * one)
    run_dir = None
    try:
        trained = pretrain(run_cfg)
        run_dir = trained.path
        new = read_lm_bundle(run_dir)
        scores = {}
        for side, bundle in (("old", old), ("new", new)):
            for table, value in score(bundle.model, bundle.tokenizer, stream, old.config, held_out).items():
                scores.setdefault(table, {})[side] = value
        verdict = judge(upd.gate, OUTPUT, "loss", scores, test_label=f"reference corpus ({stream_kind})")
        rows = {
            "test": scores["test"]["old"][OUTPUT]["rows"],
            "train": len(train) * copies,
            "feedback_train": len(train),
            "feedback_held_out": len(held_out),
        }
        record = {
            "parent": parent.ref,
            "mode": "finetune",
            "config": upd.model_dump(mode="json"),
            "reference": reference,
            "corpus": {"path": str(corpus), "copies": copies, "tokens": copies * one},
            "steps": run_cfg.train.steps,
            "rows": rows,
            "skipped": {"rated bad": counts["rated bad"]},
            "feedback_ids": {
                "train": [i for t in train for i in t["feedback_ids"]],
                "held_out": [i for t in held_out for i in t["feedback_ids"]],
            },  # fmt: skip
            "scores": scores,
            "gate": {"passed": verdict.passed, "reason": verdict.reason, "output": OUTPUT, "metric": "loss"},
        }
        (run_dir / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    except BaseException:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # 4. register as candidate, promote when the gate passes
    version = registry.register(
        parent.name, run_dir, parent=parent.version, feedback_ids=record["feedback_ids"]["train"]
    )
    registry.set_alias(parent.name, CANDIDATE, version.version)
    if verdict.passed:
        registry.promote(parent.name, version.version)
    return UpdateResult(
        parent.name, parent.version, version.version, version.path, verdict.passed, verdict, scores, rows,
        record["skipped"], "finetune", sections=SECTIONS, units=("windows", "texts"),
    )  # fmt: skip
