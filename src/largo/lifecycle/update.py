"""`largo update NAME`: fine-tune or retrain the production version on its data plus feedback, gate it.

1. the parent: NAME's production version; its data files must still hash as its lineage recorded,
   otherwise its frozen test split cannot be re-created and the update stops
2. data: the parent's splits re-created from its config (same file, same split seed → the same
   train / valid / test rows) and the model's feedback from the store: corrections joined to the
   input their prediction logged, and imported labelled rows. A hash of each row's key puts it, for
   good, in the train part or in the held-out slice (`holdout`), so a held-out row is never trained
   on, in this update or a later one. Feedback rows are weighted by repetition (`feedback_weight`
   copies in the train data): the losses have no per-example weight
3. train: `finetune` starts from the parent's weights with its processors (vocabularies, scalers)
   at a lower rate; `retrain` fits processors and weights from scratch
4. old and new are scored on the frozen test split and the held-out feedback; the gate compares them
5. the bundle (with update.json) is registered as `candidate` with its lineage and promoted to
   `production` only when the gate passes

A language model takes the same steps on its own terms (feedback texts, perplexity): update_lm.py; a
seq2seq model too (feedback pairs, chrF): update_seq2seq.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch
import yaml
from pydantic import Field, ValidationError

# the run's data steps, shared with `largo train` (they live in api.py, above this stage)
from largo.config import (
    Config,
    ConfigError,
    StrictModel,
    apply_overrides,
    format_validation_error,
    lower_is_better,
    validate_config,
)
from largo.data.clean import clean_table
from largo.data.readers import DataError
from largo.deploy.bundle import (
    environment,
    load_weights,
    new_run_dir,
    read_bundle_info,
    write_bundle,
    write_run_start,
)
from largo.deploy.metadata import (
    EXPORT_RECORD,
    BundleInfo,
    ParityError,
    is_lm_bundle,
    is_seq2seq_bundle,
    read_json,
)
from largo.evaluate.scoring import headline, score_outputs
from largo.lifecycle.registry import Registry, Version, data_lineage
from largo.models.build import build_model
from largo.train.checkpoint import seed_everything
from largo.train.distributed import log, world_size
from largo.train.loop import fit, forward_in_batches
from largo.train.losses import make_loss_fn
from largo.train.prepare import augmenter, class_weights, encode_split, fit_processors, load_splits

CANDIDATE = "candidate"
RECORD = "update.json"
METRICS = {
    "category": ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro"),
    "number": ("rmse", "mse", "mae", "r2"),
    "lm": ("loss", "perplexity"),
    "text": ("chrf", "bleu", "exact_match", "loss", "perplexity"),  # a seq2seq model's target
}
DEFAULT_METRIC = {"category": "accuracy", "number": "rmse"}


class UpdateError(ValueError):
    """An update that cannot run: no production version, changed data, no feedback, a bad gate."""


# ------------------------------------------------------------------------------------------- config


class GateConfig(StrictModel):
    """When a new version may replace production."""

    metric: Literal["auto", "accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro",
                    "rmse", "mse", "mae", "r2", "loss", "chrf", "bleu", "exact_match", "perplexity"] = Field(
        "auto", description="Metric compared; auto: accuracy for a category output, rmse for a number, "
        "loss (mean token loss in nats: a gain of 0.01 is 1% lower perplexity) for a language model, "
        "chrf (0-100) of beam-searched outputs for a seq2seq model."
    )  # fmt: skip
    output: str | None = Field(None, description="The output judged; default: the first output.")
    min_gain: float = Field(
        0.01,
        description="Least improvement on the held-out feedback, in the metric's units (an error metric "
        "such as rmse improves by going down); the default asks for a point of accuracy: better, not equal.",
    )
    max_regression: float = Field(
        0.01, ge=0.0, description="Largest loss allowed on the frozen test split (metric units)."
    )


class UpdateConfig(StrictModel):
    """How `largo update` builds, trains and judges the new version."""

    mode: Literal["finetune", "retrain"] = Field(
        "finetune", description="finetune: start from the production weights; retrain: from scratch."
    )
    epochs: int | None = Field(None, ge=1, description="Epochs; default 5 (finetune) or the parent's.")
    steps: int | None = Field(
        None,
        ge=1,
        description="A language model's optimizer steps; default two passes over the (repeated) "
        "feedback corpus, 10 to 1000.",
    )
    lr: float | None = Field(
        None, gt=0.0, description="Peak lr; default parent's × 0.3 (finetune) or its own."
    )
    feedback_weight: int = Field(
        1, ge=1, le=100, description="Copies of each feedback row in the train data (weight by repetition)."
    )
    holdout: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of feedback held out (never trained on) to judge the gain."
    )
    gate: GateConfig = Field(default_factory=GateConfig)


class UpdateFile(StrictModel):
    """The update config file: one `update:` section."""

    update: UpdateConfig = Field(default_factory=UpdateConfig)


def load_update_config(
    source: str | Path | dict | UpdateConfig | None = None, overrides: list[str] | None = None
) -> UpdateConfig:
    """An UpdateConfig from a YAML file (`update: {...}`), a dict of the same, or defaults; `--set` applied.

    Errors name the key path (`update.mode`), the value and what is allowed (ConfigError).
    """
    if isinstance(source, UpdateConfig):
        source = {"update": source.model_dump(mode="json")}
    label = str(source) if isinstance(source, str | Path) else "update config"
    if isinstance(source, str | Path):
        try:
            data = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    else:
        data = dict(source or {})
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {label}: expected a mapping with an 'update' section")
    try:
        return UpdateFile.model_validate(apply_overrides(data, overrides or [])).update
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, label)) from None


# --------------------------------------------------------------------------------------------- data


def check_data(parent: Version) -> None:
    """The parent's data files must hash as recorded at registration: the frozen splits depend on them."""
    recorded = parent.lineage.get("data") or []
    if not recorded:
        raise UpdateError(f"{parent.ref}: its lineage names no data files; cannot re-create its test split")
    now = {d["path"]: d["sha256"] for d in data_lineage(parent.path)}
    for d in recorded:
        current = now.get(d["path"])
        if d["sha256"] is None or current is None or current != d["sha256"]:
            state = "is missing" if current is None else f"changed (sha256 {d['sha256']} → {current})"
            raise UpdateError(
                f"{parent.ref}: its {d['split']} data {d['path']} {state} since it was registered, so the "
                "frozen test split of the original run cannot be re-created; restore the file"
            )


def in_holdout(key: str, share: float) -> bool:
    """A stable coin per feedback key: the same row is held out in every update."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < share


@dataclass
class Feedback:
    """The model's feedback as records of raw columns, split into train and held-out parts."""

    train: list[dict[str, Any]] = field(default_factory=list)
    held_out: list[dict[str, Any]] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)
    held_out_ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def collect_feedback(registry: Registry, name: str, cfg: Config, holdout: float) -> Feedback:
    """Feedback rows → training records {input columns…, output columns…}.

    A correction is joined to its logged prediction's input; for a model with several outputs the
    outputs not corrected keep the logged prediction. The latest correction of an output wins.
    """
    rows = registry.store.feedback_rows(name)
    logged = registry.store.predictions_by_id([r["prediction_id"] for r in rows if r["prediction_id"]])
    groups: dict[str, dict[str, Any]] = {}  # key → {"ids", "input", "labels", "logged"}
    fb = Feedback()
    for r in rows:  # oldest first: a later correction overwrites an earlier one
        pid = r["prediction_id"]
        if pid and pid not in logged:
            why = "its prediction is not in the store"
            fb.skipped[why] = fb.skipped.get(why, 0) + 1
            continue
        key = pid or r["id"]
        g = groups.setdefault(
            key, {"ids": [], "labels": {}, "logged": logged.get(pid, {}).get("output") or {}}
        )
        g["input"] = logged[pid]["input"] if pid else (r["input"] or {})
        g["ids"].append(r["id"])
        g["labels"][r["output"]] = r["label"]
    for key, g in groups.items():
        record, why = _record(g, cfg)
        if record is None:
            fb.skipped[why] = fb.skipped.get(why, 0) + len(g["ids"])
        elif in_holdout(key, holdout):
            fb.held_out.append(record)
            fb.held_out_ids += g["ids"]
        else:
            fb.train.append(record)
            fb.train_ids += g["ids"]
    return fb


def _record(group: dict[str, Any], cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """One feedback group → a row of raw columns, or None and why it cannot be trained on."""
    record: dict[str, Any] = {}
    raw = group["input"] if isinstance(group["input"], dict) else {}
    for f in cfg.inputs:
        value = raw.get(f.source, raw.get(f.name))
        if f.source not in raw and f.name not in raw:
            return None, f"input {f.name!r} missing"
        if f.type == "image" and not isinstance(value, str):
            return None, "image sent as bytes (the log keeps only its hash)"
        record[f.source] = value
    for f in cfg.outputs:
        label = group["labels"].get(f.name, group["logged"].get(f.name))
        if label is None:
            return None, f"no label for output {f.name!r}"
        record[f.source] = label
    return record, ""


def records_table(records: list[dict[str, Any]], like: pa.Table) -> pa.Table:
    """Records as a table with `like`'s columns and types (labels '3' → 3 for an integer column)."""
    arrays = []
    for column in like.schema:
        values = pa.array([r.get(column.name) for r in records])
        try:
            arrays.append(values.cast(column.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise DataError(
                f"feedback column {column.name!r} does not fit the training data's type {column.type}: {exc}"
            ) from None
    return pa.Table.from_arrays(arrays, schema=like.schema)


def _columns(cfg: Config) -> list[str]:
    return list(dict.fromkeys(f.source for f in [*cfg.inputs, *cfg.outputs]))


def _clean(table: pa.Table, cfg: Config) -> pa.Table:
    inputs, targets = [f.source for f in cfg.inputs], [f.source for f in cfg.outputs]
    return clean_table(table, inputs=inputs, targets=targets, config=cfg.data.clean)[0]


# -------------------------------------------------------------------------------------------- train


def update_run_config(cfg: Any, upd: UpdateConfig, validate: Any = validate_config) -> Any:
    """The parent's config (a model's; a seq2seq model's with its `validate`) with the update's epochs
    and lr (data untouched: the splits stay frozen)."""
    data = cfg.model_dump(mode="json")
    finetune = upd.mode == "finetune"
    data["train"]["epochs"] = upd.epochs or (5 if finetune else cfg.train.epochs)
    data["train"]["optimizer"]["lr"] = upd.lr or cfg.train.optimizer.lr * (0.3 if finetune else 1.0)
    return validate(data, source="update run config")


def _score(model: Any, cfg: Config, processors: dict, table: pa.Table, label: str) -> dict[str, Any] | None:
    if table.num_rows == 0:
        return None
    split = encode_split(table, cfg, processors, label)
    outputs = forward_in_batches(model, split.inputs, cfg.train.eval_batch_size, pad=split.pad)
    return score_outputs(outputs, split.targets, cfg.outputs, processors)


def compare(
    parent: BundleInfo, new: tuple[Any, Config, dict], tables: dict[str, pa.Table]
) -> dict[str, dict[str, Any]]:
    """{table name: {"old": scores, "new": scores}} (None for an empty table), each model with its own
    config and processors."""
    old = (load_weights(parent), parent.config, parent.processors)
    label = {"test": "frozen test", "feedback": "held-out feedback"}
    return {
        name: {side: _score(*m, table, label.get(name, name)) for side, m in (("old", old), ("new", new))}
        for name, table in tables.items()
    }


def train_version(
    parent: BundleInfo, cfg: Config, mode: str, tables: dict[str, pa.Table], run_dir: Path
) -> tuple[torch.nn.Module, dict, Any]:
    """Fine-tune the parent's model (its processors kept) or retrain one from scratch; returns
    (model on CPU, processors, FitResult)."""
    if mode == "finetune":
        processors, model = parent.processors, load_weights(parent)
    else:
        processors = fit_processors(tables["train"], cfg)
        seed_everything(cfg.train.seed)
        model = build_model(cfg, processors)
    write_run_start(run_dir, cfg, processors)
    train = encode_split(tables["train"], cfg, processors, "train + feedback")
    valid = encode_split(tables["valid"], cfg, processors, "valid") if tables["valid"].num_rows else None

    def score_fn(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return headline(score_outputs(outputs, valid.targets, cfg.outputs, processors))

    loss_fn = make_loss_fn(cfg.outputs, class_weights(cfg, train, processors))
    result = fit(model, train, valid, cfg.train, loss_fn, score_fn=score_fn,
                 transform=augmenter(cfg, processors))  # fmt: skip
    return model.cpu().eval(), processors, result


def run_layout(parent: Version) -> tuple[Path, str]:
    """(runs folder, run name) of a registered bundle at `<runs>/<name>/v<N>`, where an update writes
    the next version; another layout is an UpdateError (the new version would land somewhere odd)."""
    path = parent.path
    if not re.fullmatch(r"v\d+", path.name):
        raise UpdateError(
            f"{parent.ref}: its bundle {path} is not a run folder <runs>/<name>/v<N>, so there is no run "
            "to add the next version to; register bundles where largo train / pretrain wrote them"
        )
    return path.parent.parent, path.parent.name


# --------------------------------------------------------------------------------------------- gate


@dataclass
class Verdict:
    """The gate's decision and the sentence that explains it."""

    passed: bool
    reason: str
    metric: str
    output: str


def gate_metric(gate: GateConfig, cfg: Config) -> tuple[str, str]:
    """(output, metric) the gate compares; a metric that does not fit the output is a ConfigError."""
    outputs = {f.name: f.type for f in cfg.outputs}
    output = gate.output or cfg.outputs[0].name
    if output not in outputs:
        raise ConfigError(f"update.gate.output: {output!r} is not an output; allowed: {', '.join(outputs)}")
    kind = outputs[output]
    metric = DEFAULT_METRIC[kind] if gate.metric == "auto" else gate.metric
    if metric not in METRICS[kind]:
        raise ConfigError(
            f"update.gate.metric: {metric!r} does not apply to the {kind} output {output!r}; "
            f"allowed: {', '.join(METRICS[kind])}"
        )
    return output, metric


def gain(metric: str, old: float, new: float) -> float:
    """How much better new is than old (positive: better; an error metric improves by going down)."""
    return old - new if lower_is_better(metric) else new - old


def judge(
    gate: GateConfig,
    output: str,
    metric: str,
    scores: dict[str, dict[str, Any]],
    test_label: str = "frozen test",
) -> Verdict:
    """Pass when the feedback gain ≥ min_gain and the loss on the test data ≤ max_regression."""
    test_old, test_new = scores["test"]["old"][output][metric], scores["test"]["new"][output][metric]
    regression = -gain(metric, test_old, test_new)
    test_ok = regression <= gate.max_regression + 1e-12
    test_text = (
        f"{test_label} {metric} {test_old:.4f} → {test_new:.4f} (regression {regression:+.4f} "
        f"{'≤' if test_ok else '>'} max_regression {gate.max_regression:.4f})"
    )
    if scores["feedback"]["old"] is None:
        return Verdict(False, f"no held-out feedback rows to measure a gain on; {test_text}", metric, output)
    fb_old, fb_new = scores["feedback"]["old"][output][metric], scores["feedback"]["new"][output][metric]
    fb_gain = gain(metric, fb_old, fb_new)
    fb_ok = fb_gain >= gate.min_gain - 1e-12
    fb_text = (
        f"feedback {metric} {fb_old:.4f} → {fb_new:.4f} (gain {fb_gain:+.4f} "
        f"{'≥' if fb_ok else '<'} min_gain {gate.min_gain:.4f})"
    )
    return Verdict(fb_ok and test_ok, f"{fb_text}; {test_text}", metric, output)


# ------------------------------------------------------------------------------------------- update


@dataclass
class UpdateResult:
    """What an update did: the new version, the scores of old and new, and the gate's verdict."""

    name: str
    parent: int
    version: int
    path: Path
    promoted: bool
    verdict: Verdict
    scores: dict[str, dict[str, Any]]  # {"test"|"feedback": {"old"|"new": scores or None}}
    rows: dict[str, int]  # test, feedback_train (before weighting), feedback_held_out, train
    skipped: dict[str, int]
    mode: str
    sections: tuple[str, str] = ("frozen test", "feedback slice")  # what the table calls the two
    units: tuple[str, str] = ("rows", "rows")  # what their counts count

    def table(self) -> str:
        """The side-by-side comparison and the verdict, as printed by `largo update`."""
        return comparison_table(self)


def comparison_table(r: UpdateResult) -> str:
    """old vs new on the frozen test split and the feedback slice, one line per metric."""
    old, new = f"v{r.parent} (old)", f"v{r.version} (new)"
    lines = [f"{'':<30} {old:>12} {new:>12} {'change':>9}"]
    sections = (
        ("test", r.sections[0], r.rows["test"], r.units[0]),
        ("feedback", r.sections[1], r.rows["feedback_held_out"], r.units[1]),
    )
    for key, title, n, unit in sections:
        lines.append(f"{title} ({n} {unit})")
        before, after = r.scores[key]["old"], r.scores[key]["new"]
        if before is None or after is None:
            lines.append("  (no rows)")
            continue
        for output, m in after.items():
            for metric in METRICS[m["type"]]:
                a, b = before[output].get(metric), m.get(metric)
                if a is None or b is None:
                    continue
                mark = " *" if (output, metric) == (r.verdict.output, r.verdict.metric) else ""
                label = f"  {metric}" if len(after) == 1 else f"  {output}.{metric}"
                lines.append(f"{label + mark:<30} {a:>12.4f} {b:>12.4f} {b - a:>+9.4f}")
    state = f"promoted v{r.version} to production" if r.promoted else (
        f"v{r.version} stays candidate; production stays v{r.parent}"
    )  # fmt: skip
    lines.append(f"gate {'PASSED' if r.verdict.passed else 'BLOCKED'}: {r.verdict.reason}")
    lines.append(state)
    return "\n".join(lines)


def update(registry: Registry, ref: str, upd: UpdateConfig) -> UpdateResult:
    """Build the data, train, compare, register as candidate and promote if the gate passes.

    Args:
        registry: the registry (and store) holding the model and its feedback.
        ref: `NAME` (its production version), or `NAME@VERSION` / `NAME@ALIAS` to update another.
        upd: the update config.
    Returns:
        UpdateResult; `table()` is the comparison `largo update` prints.
    """
    # 1. the parent, its unchanged bundle and data
    if world_size() > 1:  # every rank would train, register and promote its own version
        raise UpdateError("largo update runs in one process; start it without torchrun")
    parent = registry.lookup(ref)
    if is_lm_bundle(parent.path):  # fine-tuned on its feedback texts, judged on perplexity
        from largo.lifecycle.update_lm import update_lm

        return update_lm(registry, parent, upd)
    if is_seq2seq_bundle(parent.path):  # its pairs plus feedback pairs, judged on chrF
        from largo.lifecycle.update_seq2seq import update_seq2seq

        return update_seq2seq(registry, parent, upd)
    registry.verify(parent)
    check_data(parent)
    info = read_bundle_info(parent.path)
    cfg = info.config
    output, metric = gate_metric(upd.gate, cfg)

    # 2. data: the frozen splits and the feedback
    tables, _ = load_splits(cfg)
    test = tables["test"] if tables["test"].num_rows else tables["valid"]
    fb = collect_feedback(registry, parent.name, cfg, upd.holdout)
    if not fb.train:
        raise UpdateError(
            f"{parent.name}: no feedback rows to train on ({len(fb.held_out)} held out, skipped: "
            f"{fb.skipped or 'none'}); collect corrections first (POST /feedback or largo feedback import)"
        )
    columns = _columns(cfg)
    train_part = tables["train"].select(columns)
    fb_train = _clean(records_table(fb.train, train_part), cfg)  # cleaned before the copies: no dedup
    held_out = _clean(records_table(fb.held_out, train_part), cfg)
    data = {
        "train": pa.concat_tables([train_part] + [fb_train] * upd.feedback_weight),
        "valid": tables["valid"],
    }

    # 3. train the new version into the run's next folder (removed again if anything fails)
    run_cfg = update_run_config(cfg, upd)
    run_dir = new_run_dir(*run_layout(parent))
    try:
        model, processors, fit_result = train_version(info, run_cfg, upd.mode, data, run_dir)
        scores = compare(info, (model, run_cfg, processors), {"test": test, "feedback": held_out})
        verdict = judge(upd.gate, output, metric, scores)
        rows = {
            "test": test.num_rows,
            "train": data["train"].num_rows,
            "feedback_train": fb_train.num_rows,
            "feedback_held_out": held_out.num_rows,
        }
        record = {
            "parent": parent.ref,
            "mode": upd.mode,
            "config": upd.model_dump(mode="json"),
            "rows": rows,
            "skipped": fb.skipped,
            "feedback_ids": {"train": fb.train_ids, "held_out": fb.held_out_ids},
            "scores": scores,
            "gate": {"passed": verdict.passed, "reason": verdict.reason, "output": output, "metric": metric},
        }
        _write_bundle(run_dir, model, run_cfg, processors, fit_result, scores, rows, parent.ref)
        (run_dir / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # 4. register as candidate, promote when the gate passes
    version, verdict = register_candidate(registry, parent, run_dir, fb.train_ids, verdict)
    return UpdateResult(
        parent.name, parent.version, version.version, version.path, verdict.passed, verdict, scores, rows,
        fb.skipped, upd.mode,
    )  # fmt: skip


def register_candidate(
    registry: Registry, parent: Version, run_dir: Path, feedback_ids: list[str], verdict: Verdict
) -> tuple[Version, Verdict]:
    """Export an update's bundle as its parent was exported (`export_like_parent`), register it as the
    next version (lineage: its parent and the feedback rows it trained on), point `candidate` at it, and
    promote it to production when the gate passed (and the export's checks did). Returns the version
    and the verdict that decided."""
    verdict = export_like_parent(parent, run_dir, verdict)
    version = registry.register(parent.name, run_dir, parent=parent.version, feedback_ids=feedback_ids)
    registry.set_alias(parent.name, CANDIDATE, version.version)
    if verdict.passed:
        registry.promote(parent.name, version.version)
    return version, verdict


def export_like_parent(parent: Version, run_dir: Path, verdict: Verdict) -> Verdict:
    """Export the new bundle as the parent was (the formats in its export.json: ONNX, int8 when it has
    an int8 graph, TorchScript), checked as `largo export` checks, before it is registered (a registered
    bundle never changes): a server running the parent on ONNX Runtime can then swap the new version in.
    A failed check blocks the promotion; held-out data the check cannot find (a language model's
    feedback corpus too small to hold a window, say) leaves the new version unexported, as an update
    before this step left it. The update record says which."""
    formats = set(read_json(parent.path / EXPORT_RECORD).get("formats") or {})
    formats &= {"onnx", "onnx-int8", "torchscript"}
    if not formats:
        return verdict
    onnx = bool(formats & {"onnx", "onnx-int8"})
    kind = ("all" if "torchscript" in formats else "onnx") if onnx else "torchscript"
    quantize = "int8" if "onnx-int8" in formats else "none"
    from largo.api import export

    record_file = run_dir / RECORD
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.exists() else {}
    # a language model's update trains on its feedback corpus: check on the reference corpus it is judged on
    lineage = (record.get("reference") or {}).get("lineage") or [{}]
    failure = skipped = None
    try:
        export(run_dir, kind, quantize, lineage[0].get("path"))
    except DataError as exc:  # before ValueError, which it is
        skipped = f"not exported: no held-out data to check an export on ({exc})"
        log(f"{run_dir}: {skipped}")
    except (ParityError, ValueError) as exc:
        failure = f"exported as its parent was ({kind}, quantize {quantize}), it failed: {exc}"
    record["export"] = {"format": kind, "quantize": quantize, "passed": failure is None and skipped is None,
                        "error": failure or skipped}  # fmt: skip
    if failure is not None and verdict.passed:
        verdict = replace(verdict, passed=False, reason=f"{verdict.reason}; but {failure}")
        record.setdefault("gate", {}).update(passed=False, reason=verdict.reason)
    record_file.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return verdict


def _write_bundle(
    run_dir: Path,
    model: Any,
    cfg: Config,
    processors: dict,
    fit_result: Any,
    scores: dict,
    rows: dict,
    parent: str,
) -> None:
    """metrics.json (the frozen test as `test`, the held-out feedback as `feedback`) and the report."""
    metrics = {
        "name": cfg.name,
        "version": run_dir.name,
        "parent": parent,
        "history": fit_result.history,
        "best_epoch": fit_result.best_epoch,
        "stopped_early": fit_result.stopped_early,
        "steps": fit_result.steps,
        "train_time_s": fit_result.train_time_s,
        "splits": rows,
        "seed": cfg.train.seed,
        "versions": environment(),
        "config": cfg.model_dump(mode="json"),
        "test": scores["test"]["new"],
        "feedback": scores["feedback"]["new"],
    }
    write_bundle(run_dir, model, metrics, {})
