"""`largo update NAME` on a language model: fine-tune the production LM on its feedback, gate it.

1. the settings (finetune only; steps, not epochs; the gate's metric is the token loss), the parent:
   NAME's production version, its files verified, at `<runs>/<name>/v<N>`
2. data: the feedback as texts to learn from, one per generation (corrections, and generations rated
   good; the rule of `largo feedback export`). A hash of the generation id puts each, for good, in
   the train part or in the held-out slice (`holdout`), as for a classifier; an update with nothing
   to train on or nothing held out stops before it trains
3. the reference corpus: the corpus the parent was pretrained on or, for a version an update made,
   the reference its update recorded (so a chain of updates is always judged on the original corpus;
   a version fine-tuned by hand with `largo pretrain feedback.jsonl` has that file as its corpus).
   Its files must still hash as recorded; its held-out stream (its training windows when it held
   nothing out) is re-created with the parent's tokenizer and cached
4. train: `pretrain` from the parent's weights and tokenizer (`train.init_from`) on the train texts
   as prompt/completion pairs (`data.prompt_field`: the prompt is context, only the completion and its
   end-of-text token are trained on), written as a JSONL corpus under `<runs>/<name>/.feedback/`,
   repeated `feedback_weight` times, and as often as it takes to fill two context windows; one
   micro-batch per step for `steps` steps (default: five passes over the feedback × feedback_weight,
   at most 1000) at the parent's lr × 0.3 unless `lr` is given; the parent's LoRA settings, if it had
   any, are used again (saved merged). A failed fine-tune leaves no run folder and no corpus behind
5. old and new are scored, in fp32, on
   - the held-out feedback: the completions' mean token loss given their prompts (prompt tokens are
     context, not targets; prompt and completion encoded apart, as generation sees them and as
     training reads them); the gain is old − new in nats (0.01 ≈ 1% lower perplexity)
   - the reference stream: the mean token loss of the same windows for both; the regression is new − old
6. the bundle (with update.json: the reference, the scores, the verdict, the feedback ids) is
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
from largo.deploy.lm_text import encode_prompt
from largo.deploy.metadata import read_json
from largo.lifecycle.feedback import lm_feedback_texts, write_jsonl
from largo.lifecycle.registry import Registry, Version, path_sha256
from largo.lifecycle.update import (
    RECORD,
    UpdateConfig,
    UpdateError,
    UpdateResult,
    in_holdout,
    judge,
    register_candidate,
    run_layout,
)
from largo.models.gpt import GPT, IGNORE
from largo.train.lm import evaluate_lm

OUTPUT = "text"  # the one output of a language model, as the scores and the gate name it


# ---------------------------------------------------------------------------------------- reference


def reference_of(parent: Version, config: LMConfig) -> dict[str, Any]:
    """{"data": an LM config's data section, "lineage": [{path, sha256}]}: the corpus whose held-out
    stream judges regressions; its files must hash as recorded."""
    record = parent.path / RECORD
    if record.is_file():  # an updated version: the reference its own update was judged on
        reference = read_json(record)["reference"]
    else:
        lineage = [d for d in parent.lineage.get("data") or [] if d.get("split") == "corpus"]
        reference = {"data": config.data.model_dump(mode="json"), "lineage": lineage}
    if not reference["lineage"]:
        raise UpdateError(
            f"{parent.ref}: its lineage names no corpus files to measure a regression on (an imported "
            "model has none: fine-tune it on your corpus with train.init_from and register that version)"
        )
    for d in reference["lineage"]:
        now = path_sha256(d["path"])
        if d["sha256"] is None:
            raise UpdateError(
                f"{parent.ref}: its corpus {d['path']} was not found when it was registered, so there is "
                "no held-out stream to judge an update on; register a version whose corpus is on disk"
            )
        if now != d["sha256"]:
            state = "is missing" if now is None else f"changed (sha256 {d['sha256']} → {now})"
            raise UpdateError(
                f"{parent.ref}: its reference corpus {d['path']} {state} since it was registered, so "
                "the held-out stream the update is judged on cannot be re-created; restore the file"
            )
    return reference


def cache_dir(parent: LMBundle) -> Path:
    """Where the update caches token files: the parent config's cache folder when it names one, else
    `<runs>/.cache` beside the parent's run (not a folder relative to where the command runs)."""
    named = parent.config.data.cache_dir
    return Path(named).resolve() if named else parent.path.parent.parent / ".cache"


def reference_stream(parent: LMBundle, reference: dict[str, Any]) -> tuple[Any, Any, str]:
    """The reference corpus's held-out token stream and its target mask (None but for a pairs corpus),
    tokenized with the parent's tokenizer and cached like any corpus, or its training stream when it
    holds nothing out; and which one it is."""
    data = {**reference["data"], "paths": [d["path"] for d in reference["lineage"]]}  # absolute paths
    data["cache_dir"] = data.get("cache_dir") or str(cache_dir(parent))
    cfg = parent.config.model_copy(update={"data": CorpusConfig.model_validate(data)})
    _, data = prepare_corpus(cfg, parent.tokenizer, chat=parent.chat_template)
    if len(data.valid) >= 2:
        return data.valid, data.valid_mask, "held out"
    return data.train, data.train_mask, "training windows: none held out"


# --------------------------------------------------------------------------------------------- score


def completion_windows(
    prompt: list[int], completion: list[int], context: int
) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of at most `context` inputs that score every completion token once;
    prompt targets are IGNORE (context, not scored). A text longer than the context is read in windows
    from its end back, overlapping by half, so each scored token sees at least half a context before it."""
    ids, first = prompt + completion, len(prompt)  # ids[first] is the first completion token
    stride = max(1, context // 2)
    windows, end = [], len(ids)
    while end > first:  # ids[lo:end - 1] predicts ids[lo + 1:end]; the targets from ids[start] on count
        lo = max(0, end - context - 1)
        start = max(first, lo + 1) if lo == 0 else max(first, end - stride)
        windows.append((ids[lo : end - 1], [IGNORE] * (start - lo - 1) + ids[start:end]))
        end = start
    return windows


@torch.no_grad()
def completion_loss(
    model: GPT,
    tokenizer: Tokenizer,
    texts: list[dict[str, Any]],
    batch: int = 16,
    eot: str = EOT,
    bos: str | None = None,
) -> dict[str, Any] | None:
    """Mean token loss of the texts' completions given their prompts, every completion token scored
    once (a text longer than the context in overlapping windows: `completion_windows`); None without a
    completion token. Prompt and completion are encoded apart, as generation sees them."""
    context, eot_id = model.cfg.context, special_id(tokenizer, eot)
    bos_id = None if bos is None else special_id(tokenizer, bos)
    rows, texts_scored = [], 0
    for t in texts:
        prompt = encode_prompt(tokenizer, t["prompt"], eot_id, bos_id)  # as generation reads it
        completion = tokenizer.encode(t["completion"], add_special_tokens=False).ids
        if completion:
            rows += completion_windows(prompt, completion, context)
            texts_scored += 1
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
    return _scores(total / count, count, texts_scored)


def _scores(loss: float, tokens: int, rows: int) -> dict[str, Any]:
    perplexity = math.exp(min(loss, 50.0))
    return {OUTPUT: {"type": "lm", "loss": loss, "perplexity": perplexity, "tokens": tokens, "rows": rows}}


def stream_loss(model: GPT, tokens: Any, mask: Any, config: LMConfig) -> dict[str, Any] | None:
    """Mean token loss of the parent config's evaluation windows of a token stream (the same windows
    for every model)."""
    context, train = model.cfg.context, config.train
    nothing = contextlib.nullcontext()
    result = evaluate_lm(model, tokens, context, train.micro_batch, train.eval_batches, nothing, mask)
    if result is None:
        return None
    return _scores(result["loss"], result["tokens"], result["windows"])


def score(
    model: GPT, tokenizer: Tokenizer, stream: tuple[Any, Any], config: LMConfig, held_out: list[dict]
) -> dict:
    """{"test": scores on the reference stream, "feedback": on the held-out feedback}."""
    model.float()
    return {
        "test": stream_loss(model, *stream, config),
        "feedback": completion_loss(
            model, tokenizer, held_out, eot=config.tokenizer.eot, bos=config.tokenizer.bos
        ),
    }


# --------------------------------------------------------------------------------------------- train


def corpus_copies(
    tokenizer: Tokenizer, texts: list[dict[str, Any]], context: int, weight: int
) -> tuple[int, int]:
    """(copies of the feedback texts in the corpus, tokens of one copy): `weight` copies, or more to fill
    two windows of context + 1 tokens."""
    pieces = [t["prompt"] for t in texts] + [t["completion"] for t in texts]
    one = sum(len(e.ids) for e in tokenizer.encode_batch(pieces, add_special_tokens=False))
    one += len(texts)  # each record ends with EOT in the token file
    return max(weight, math.ceil(2 * (context + 2) / max(1, one))), one


def check_settings(upd: UpdateConfig) -> None:
    """The update settings a language model cannot take (ConfigError naming the key)."""
    if upd.mode != "finetune":
        raise ConfigError(
            f"update.mode: {upd.mode!r} does not apply to a language model; allowed: finetune "
            "(pretrain a new one with `largo pretrain`, then `largo registry add` it)"
        )
    if upd.epochs is not None:
        raise ConfigError(
            "update.epochs: a language model trains for update.steps (optimizer steps), not epochs"
        )
    if upd.gate.metric not in ("auto", "loss"):
        raise ConfigError(
            f"update.gate.metric: {upd.gate.metric!r} does not apply to a language model; allowed: auto, loss"
        )
    if upd.gate.output not in (None, OUTPUT):
        raise ConfigError(f"update.gate.output: {upd.gate.output!r} is not an output; allowed: {OUTPUT}")


def finetune_config(
    parent: LMBundle, upd: UpdateConfig, corpus: Path, feedback_tokens: int, runs: Path, name: str
) -> LMConfig:
    """The parent's config, continued from its weights on the feedback corpus: one micro-batch per
    step, `update.steps` or five passes over the feedback (× feedback_weight), at most 1000 steps."""
    base = parent.config
    data = base.model_dump(mode="json")
    data |= {"name": name, "runs_dir": str(runs)}
    data["data"] = {"paths": [str(corpus)], "prompt_field": "prompt", "text_field": "completion",
                    "encoding": "utf-8", "valid": 0.0, "cache_dir": str(cache_dir(parent))}  # fmt: skip
    train = data["train"]
    per_step = base.train.micro_batch * base.model.context
    steps = upd.steps or min(1000, math.ceil(5 * upd.feedback_weight * feedback_tokens / per_step))
    train |= {"steps": steps, "init_from": str(parent.path), "eval_every": steps, "keep_checkpoint": False}
    train["tokens_per_step"] = None  # the parent's step size was for its corpus, not a few texts
    train["optimizer"]["lr"] = upd.lr or base.train.optimizer.lr * 0.3
    train["checkpoint_every"] = min(train["checkpoint_every"], steps)
    if train.get("lora"):
        train["lora"]["save"] = "merged"  # the registry holds full bundles
    return validate_lm_config(data, "update run config")


def _remove_failed_run(root: Path, before: set[str], corpus: Path) -> None:
    """Remove the run folder a failed fine-tune left (a new version folder whose config trains on this
    update's corpus) and the corpus itself."""
    for folder in root.glob("v*"):
        config = folder / "config.yaml"
        if folder.name not in before and config.is_file() and str(corpus) in config.read_text("utf-8"):
            shutil.rmtree(folder, ignore_errors=True)
    corpus.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- update


def update_lm(registry: Registry, parent: Version, upd: UpdateConfig) -> UpdateResult:
    """Fine-tune a registered language model on its feedback, compare, register, promote if the gate
    passes (see the module doc)."""
    from largo.api_lm import pretrain

    # 1. the settings, the parent and where its next version goes
    check_settings(upd)
    registry.verify(parent)
    runs, name = run_layout(parent)

    # 2. the feedback, split for good into train and held-out texts
    texts, counts = lm_feedback_texts(registry, parent.name)
    train = [t for t in texts if t["completion"] and not in_holdout(t["prediction_id"], upd.holdout)]
    held_out = [t for t in texts if in_holdout(t["prediction_id"], upd.holdout)]
    if not train:
        raise UpdateError(
            f"{parent.name}: no feedback texts to train on ({len(held_out)} held out; {counts['rated bad']} "
            "generations only rated bad); collect corrections or good ratings first (POST /feedback)"
        )
    if not any(t["completion"] for t in held_out):
        raise UpdateError(
            f"{parent.name}: no held-out feedback to judge a gain on ({len(texts)} texts, update.holdout = "
            f"{upd.holdout}); collect more feedback or raise update.holdout"
        )

    # 3. the reference corpus's held-out stream (tokenized once, then cached)
    old = read_lm_bundle(parent.path)
    reference = reference_of(parent, old.config)
    tokens, mask, stream_kind = reference_stream(old, reference)
    if len(tokens) < 2 or (mask is not None and not mask.any()):
        raise UpdateError(f"{parent.ref}: its reference corpus has no tokens to measure a regression on")
    reference_label = f"reference corpus ({stream_kind})"

    # 4. fine-tune into the run's next version folder (removed again if anything fails)
    copies, one = corpus_copies(old.tokenizer, train, old.config.model.context, upd.feedback_weight)
    lines = [{k: t[k] for k in ("text", "prompt", "completion", "kind", "prediction_id")} for t in train]
    corpus = write_jsonl(runs / name / ".feedback" / f"{uuid.uuid4().hex}.jsonl", lines * copies)
    before = {f.name for f in (runs / name).glob("v*")}
    run_dir = None
    try:
        run_cfg = finetune_config(old, upd, corpus, one, runs, name)
        run_dir = pretrain(run_cfg).path
        new = read_lm_bundle(run_dir)
        scores: dict[str, dict[str, Any]] = {}
        for side, bundle in (("old", old), ("new", new)):
            for table, value in score(
                bundle.model, bundle.tokenizer, (tokens, mask), old.config, held_out
            ).items():
                scores.setdefault(table, {})[side] = value
        verdict = judge(upd.gate, OUTPUT, "loss", scores, test_label=reference_label)
        rows = {
            "test": scores["test"]["old"][OUTPUT]["rows"],
            "train": len(train) * copies,
            "feedback_train": len(train),
            "feedback_held_out": scores["feedback"]["old"][OUTPUT]["rows"],
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
            },
            "scores": scores,
            "gate": {"passed": verdict.passed, "reason": verdict.reason, "output": OUTPUT, "metric": "loss"},
        }
        (run_dir / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    except BaseException:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        _remove_failed_run(runs / name, before, corpus)
        raise

    # 5. register as candidate, promote when the gate passes
    version, verdict = register_candidate(registry, parent, run_dir, record["feedback_ids"]["train"], verdict)
    sections = {"sections": (reference_label, "feedback slice"), "units": ("windows", "texts")}
    return UpdateResult(
        parent.name, parent.version, version.version, version.path, verdict.passed, verdict, scores, rows,
        record["skipped"], "finetune", **sections,
    )  # fmt: skip
