"""The pretraining loop: per-token loss over accumulated micro-batches, learning, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import largo
from largo.config_lm import GPTConfig, LMTrainConfig, validate_lm_config
from largo.data.corpus import prepare_corpus
from largo.models.gpt import GPT, IGNORE
from largo.train.lm import accumulation, lm_step, pretrain_fit, step_batches
from largo.train.loop import autocast
from tests.lm_corpus import tiny_lm_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_of_different_lengths_equal_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=32, layers=2, heads=2, context=16, vocab_size=40))
    # three fine-tuning micro-batches with different numbers of real targets (the rest IGNORE)
    micro = []
    for real in (16, 5, 11):
        x = torch.randint(0, 40, (2, 16))
        y = torch.randint(0, 40, (2, 16))
        y[:, real:] = IGNORE
        micro.append((x, y))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    amp = autocast(torch.device("cpu"), "fp32")
    loss = lm_step(model, micro, amp, scaler)
    accumulated = _grads(model)
    model.zero_grad(set_to_none=True)
    big = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]
    big_loss = lm_step(model, big, amp, scaler)
    one_batch = _grads(model)
    assert torch.allclose(loss, big_loss, atol=1e-6)
    for name, g in one_batch.items():
        assert torch.allclose(accumulated[name], g, atol=1e-6, rtol=1e-4), name
    # and it is the mean over tokens, not over micro-batches (HF Trainer's old mistake): averaging the
    # three micro-batch means would weight the 10 targets of the second like the 32 of the first
    s, c = model(*big[0])
    assert math.isclose(float(loss), float((s / c).detach()), rel_tol=1e-5)


def test_tokens_per_step_sets_the_accumulation_and_steps_draw_fixed_windows():
    cfg = LMTrainConfig(micro_batch=4, tokens_per_step=1000)
    assert accumulation(cfg, 64) == 4  # ceil(1000 / 256)
    assert accumulation(LMTrainConfig(micro_batch=4), 64) == 1
    tokens = torch.arange(5000).numpy()
    a = step_batches(tokens, 1, 7, 2, 4, 32)
    b = step_batches(tokens, 1, 7, 2, 4, 32)
    c = step_batches(tokens, 1, 8, 2, 4, 32)
    assert len(a) == 2 and a[0][0].shape == (4, 32)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))  # a function of the step
    assert not torch.equal(a[0][0], c[0][0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), lines=3000)


def test_pretraining_learns_the_corpus_and_writes_a_bundle(corpus, tmp_path):
    cfg = tiny_lm_config(corpus, tmp_path / "runs", steps=200, eval_every=100)
    cfg["train"]["optimizer"] = {"lr": 3e-3}
    result = largo.pretrain(cfg)
    history = result.metrics["history"]
    assert [r["step"] for r in history] == [100, 200]
    final = result.metrics["valid"]["lm"]
    # from uniform (ln 300 = 5.7 nats) to well under that on this repetitive corpus
    assert final["loss"] < 0.3 * math.log(300)  # from uniform (5.7 nats) to 0.84 when measured
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    assert 0 < final["bpc"] < 8
    assert history[1]["valid.loss"] < history[0]["valid.loss"]
    for name in (
        "config.yaml",
        "model.safetensors",
        "tokenizer.json",
        "metrics.json",
        "report.html",
        "loss.png",
    ):
        assert (result.path / name).exists(), name
    assert not (result.path / "checkpoints").exists()
    assert result.metrics["tokens"] == 200 * 8 * 64 and result.metrics["tokens_per_s"] > 0
    gen = largo.load(result.path)
    text = gen.generate("the cat", 20, temperature=0)
    assert text and text == gen.generate("the cat", 20, temperature=0)


def test_resume_gives_the_weights_of_an_uninterrupted_run(corpus, tmp_path):
    cfg = validate_lm_config(
        tiny_lm_config(corpus, tmp_path / "runs", steps=30, eval_every=15, checkpoint_every=10)
        | {"model": {"dim": 32, "layers": 2, "heads": 2, "context": 64, "dropout": 0.1}}  # RNG in the loop
    )
    _, data = prepare_corpus(cfg)
    model_cfg = cfg.model.model_copy(update={"vocab_size": 300})

    def fresh() -> GPT:
        torch.manual_seed(0)
        return GPT(model_cfg)

    whole = fresh()
    pretrain_fit(whole, data, cfg.train, 64)

    class Killed(Exception):
        pass

    def kill(record: dict) -> None:
        raise Killed  # at the first evaluation, step 15: the last checkpoint is step 10's

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        pretrain_fit(fresh(), data, cfg.train, 64, checkpoint_dir=ckpt, on_eval=kill)
    resumed = fresh()
    result = pretrain_fit(resumed, data, cfg.train, 64, checkpoint_dir=ckpt, resume=True)
    assert result.steps == 30 and [r["step"] for r in result.history] == [15, 30]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pretraining_on_prompt_completion_pairs_trains_and_scores_the_completions_only(tmp_path):
    """data.prompt_field: random prompts (unlearnable) and a fixed answer per prompt kind. Only the
    answers are targets, so the held-out loss falls far below the prompts' entropy, and the gradient of
    one masked window is the gradient of its completion tokens alone."""
    import json
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    answers = {"colour": " red.", "animal": " cat.", "planet": " mars."}
    lines = []
    for _ in range(1500):
        kind = rng.choice(list(answers))
        prompt = " ".join(rng.choice(words) for _ in range(6)) + f" {kind}?"
        lines.append(json.dumps({"prompt": prompt, "completion": answers[kind]}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tiny_lm_config(path, tmp_path / "runs", steps=300, optimizer={"name": "adamw", "lr": 3e-3})
    cfg["data"] |= {"prompt_field": "prompt", "text_field": "completion"}
    result = largo.pretrain(cfg)
    final = result.metrics["valid"]["lm"]
    # the answers take ~3 tokens + EOT given the kind in the prompt: far under the random words'
    # log(40) = 3.7 nats a word that a loss over the prompts would include
    assert final["loss"] < 1.0, final
    # one window by hand: the masked loss is the summed loss over the completion targets alone
    lm_cfg = validate_lm_config(cfg)
    _, data = prepare_corpus(lm_cfg)
    model = GPT(GPTConfig.model_validate({**cfg["model"], "vocab_size": data.meta["vocab_size"]}))
    ((x, y),) = step_batches(data.train, 1, 0, 1, 1, 64, mask=data.train_mask)
    assert (y == IGNORE).any() and (y != IGNORE).any()
    start = next(s for s in range(len(data.train)) if np.array_equal(data.train[s : s + 64], x[0].numpy()))
    marked = np.asarray(data.train_mask[start + 1 : start + 65]).astype(bool)  # the targets' own mask
    assert ((y[0] != IGNORE).numpy() == marked).all()
    assert (x >= 0).all()  # the inputs keep every token (a one-row window shares x's memory with y)
    loss_sum, counted = model(x, y)
    logits = model(x)
    keep = y[0] != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[0][keep], y[0][keep], reduction="sum")
    assert int(counted) == int(keep.sum()) and torch.allclose(loss_sum, by_hand, atol=1e-4)
