"""The sequence-to-sequence half of the Python API: train_seq2seq() and translate() (re-exported by
`largo.api`; `largo.train()` calls train_seq2seq for a config with `task: seq2seq`).

train_seq2seq() reads top to bottom through the stages: pairs (read → clean → split) → a shared
tokenizer fit on train → ids → encoder-decoder → the classifier's `fit()` (epochs, schedules, early
stopping, checkpoints and resume, DDP under torchrun) → test scores (token perplexity, and BLEU / chrF of
beam-searched outputs) → bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from largo.config_seq2seq import Seq2SeqConfig, load_seq2seq_config, validate_seq2seq_config
from largo.data.loader import EncodedSplit
from largo.deploy.bundle import environment, run_folder
from largo.deploy.translator import Translator
from largo.evaluate.metrics import generation_metrics, perplexity
from largo.train.checkpoint import seed_everything
from largo.train.distributed import barrier, is_main_process, log, process_group

if TYPE_CHECKING:
    from largo.api import TrainResult  # imported where it is built: largo.api imports this module

EXAMPLES = 20  # test rows shown in the report and metrics.json


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


def token_scores(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-token loss (nats), perplexity and next-token accuracy from the model's per-example sums."""
    tokens = max(1, int(outputs["tokens"].sum()))
    loss = float(outputs["nll"].double().sum()) / tokens
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "token_accuracy": float(outputs["correct"].sum()) / tokens,
    }


def _train(cfg: Seq2SeqConfig, resume: bool | str | Path) -> TrainResult:
    from tokenizers import Tokenizer

    from largo.api import TrainResult  # here: largo.api imports this module
    from largo.data.pairs import encode_pairs, load_pairs, texts, train_pair_tokenizer
    from largo.deploy.generator import TOKENIZER
    from largo.deploy.translator import write_seq2seq_bundle, write_seq2seq_start
    from largo.models.seq2seq import Seq2SeqTransformer, greedy
    from largo.train.loop import fit, forward_in_batches

    # 1. the run folder: a new version, or the unfinished one being resumed (with its own config)
    run_dir = run_folder(cfg.runs_dir, cfg.name, resume)
    if resume:
        cfg = load_seq2seq_config(run_dir / "config.yaml")
    log(f"run folder: {run_dir}")

    # 2. pairs: read → clean → split → the tokenizer fit on train (rank 0; the others read it) → ids
    tables, cleaning = load_pairs(cfg)
    if not resume and is_main_process():
        tokenizer = train_pair_tokenizer(tables["train"], cfg)
        t = cfg.tokenizer
        model_cfg = cfg.model.model_copy(
            update={
                "vocab_size": tokenizer.get_vocab_size(),
                "context": max(t.max_source_length, t.max_target_length),
            }
        )
        cfg = cfg.model_copy(update={"model": model_cfg})
        write_seq2seq_start(run_dir, cfg, tokenizer)
    barrier()
    if resume or not is_main_process():
        cfg = load_seq2seq_config(run_dir / "config.yaml")
        tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER))
    splits = {name: encode_pairs(t, cfg, tokenizer, name, log) for name, t in tables.items()}
    sizes = {name: len(s) for name, s in splits.items()}
    log("split sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    refs = {name: texts(t, cfg.data.target) for name, t in tables.items()}

    # 3. model and objective. The loss sums the tokens' losses and divides by the train split's mean
    # target length: fit() divides by the examples of a whole optimizer step, so this is a per-token
    # mean that accumulated micro-batches of any lengths reproduce exactly
    seed_everything(cfg.train.seed)
    model = Seq2SeqTransformer(cfg.model, cfg.train.label_smoothing)
    mean_tokens = max(1.0, float(splits["train"].targets["tokens"].double().mean()))

    def loss_fn(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["nll"].sum() / mean_tokens

    valid = splits["valid"] if sizes["valid"] else None
    probe = _probe(splits["valid"], refs["valid"], cfg.train.eval_generate) if valid is not None else None

    def score_fn(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        # its "loss" replaces fit's valid.loss (a per-example figure) with the exact per-token one
        return token_scores(outputs)

    def model_score_fn(judged: torch.nn.Module) -> dict[str, float]:
        # greedy outputs of the first eval_generate valid sources, from the weights being validated
        sources, references = probe
        device = next(judged.parameters()).device
        hyps = [tokenizer.decode(r) for r in greedy(judged, sources.to(device), cfg.max_new_tokens)]
        scores = generation_metrics(hyps, references)
        return {k: scores[k] for k in ("bleu", "chrf", "exact_match")}

    # 4. train
    result = fit(
        model,
        splits["train"],
        valid,
        cfg.train,
        loss_fn,
        score_fn=score_fn,
        model_score_fn=model_score_fn if probe is not None and len(probe[1]) else None,
        checkpoint_dir=run_dir / "checkpoints",
        resume=bool(resume),
    )

    # 5. scores on valid and test (token figures, then beam-searched outputs), and the bundle (rank 0)
    if not is_main_process():
        return TrainResult(run_dir, {"history": result.history}, run_dir / "report.html")
    model.cpu().eval()
    translator = Translator(run_dir, cfg, tokenizer, model)
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
        "seed": cfg.train.seed,
        "versions": environment(),
        "config": cfg.model_dump(mode="json"),
    }
    for split in ("valid", "test"):
        if not sizes[split]:
            continue
        log(f"{split}: decoding {sizes[split]} sources (beams {cfg.decode.beams})")
        s = splits[split]
        outputs = forward_in_batches(model, s.inputs, cfg.train.eval_batch_size, pad=s.pad)
        sources = texts(tables[split], cfg.data.source)
        hyps = translator.translate(sources)
        metrics[split] = {
            cfg.data.target: {
                "type": "text",
                **token_scores(outputs),
                **generation_metrics(hyps, refs[split]),
            }
        }
        rows = zip(sources, refs[split], hyps, strict=True)
        metrics["examples"] = [
            {"source": a, "reference": b, "output": c} for a, b, c in list(rows)[:EXAMPLES]
        ]
    report = write_seq2seq_bundle(run_dir, model, metrics)
    if not cfg.train.checkpoint.keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, metrics, report)


def _probe(valid: EncodedSplit, references: list[str], count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` validation sources (ids, trimmed) and their reference texts."""
    sources = valid.inputs["source"][:count]
    longest = int((sources != 0).sum(1).max()) if len(sources) else 1
    return sources[:, :longest], references[:count]


def translate(bundle: str | Path | Translator, texts: str | list[str], **options: Any) -> list[str]:
    """Translate (or summarize, or rewrite: whatever the pairs taught) texts with a seq2seq bundle.

    Args:
        bundle: a seq2seq bundle folder or a loaded Translator.
        texts: one source text or a list of them.
        options: beams, length_penalty, max_new_tokens, batch_size (defaults: the bundle's `decode`).

    Returns:
        One output text per source, in order.
    """
    translator = bundle if isinstance(bundle, Translator) else Translator.load(bundle)
    return translator.translate(texts, **options)


def predict_pairs(translator: Translator, data: Any) -> list[dict[str, str]]:
    """Outputs for a file's source column, a list of texts, a text, or records with the source field:
    one `{"source": …, "output": …}` per source."""
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
        sources = [r[column] if isinstance(r, dict) else r for r in data]
        bad = next((i for i, s in enumerate(sources) if not isinstance(s, str)), None)
        if bad is not None:
            raise DataError(f"record {bad}: needs a text {column!r} (got {sources[bad]!r})")
    return [{"source": s, "output": o} for s, o in zip(sources, translator.translate(sources), strict=True)]


def evaluate_pairs(translator: Translator, data: str | Path, report_dir: str | Path | None = None) -> dict:
    """Score a seq2seq bundle on a file of pairs: token loss and perplexity, and BLEU / chrF / exact
    match of its beam-searched outputs; writes metrics.json and report.html to report_dir.

    Returns:
        {"test": {target: metrics}, "rows": n, "cleaning": counts, "report": path}.
    """
    from largo.data.pairs import encode_pairs, read_pairs, texts
    from largo.data.readers import DataError
    from largo.evaluate.report import write_metrics_json, write_report
    from largo.train.loop import forward_in_batches

    cfg = translator.config
    table, counts = read_pairs(str(data), cfg)
    if table.num_rows == 0:
        raise DataError(f"{data}: no pairs to evaluate")
    split = encode_pairs(table, cfg, translator.tokenizer, str(data), log)
    model = translator.model
    outputs = forward_in_batches(model, split.inputs, cfg.train.eval_batch_size, pad=split.pad)
    sources, refs = texts(table, cfg.data.source), texts(table, cfg.data.target)
    hyps = translator.translate(sources)
    scores = {cfg.data.target: {"type": "text", **token_scores(outputs), **generation_metrics(hyps, refs)}}
    out_dir = Path(report_dir) if report_dir else translator.path / "evaluations" / Path(data).stem
    rows = list(zip(sources, refs, hyps, strict=True))[:EXAMPLES]
    metrics = {
        "name": cfg.name,
        "version": translator.path.name,
        "task": "seq2seq",
        "test": scores,
        "splits": {"test": table.num_rows},
        "cleaning": {"test": counts},
        "data": str(data),
        "examples": [{"source": a, "reference": b, "output": c} for a, b, c in rows],
    }
    write_metrics_json(out_dir, metrics)
    report = write_report(out_dir, metrics)
    return {"test": scores, "rows": table.num_rows, "cleaning": counts, "report": str(report)}
