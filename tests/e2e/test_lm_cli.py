"""`largo pretrain` / `largo generate` / `largo info` from the command line, on a GBK Chinese + English
corpus; a pretraining run killed with SIGKILL resumes from its checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

import largo
from largo.cli import app
from tests.lm_corpus import tiny_lm_config, write_corpus

LARGO = [sys.executable, "-m", "largo.cli"]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmcli")
    corpus = write_corpus(root / "data", lines=3000, encoding="gbk")  # a GBK file, detected
    cfg = tiny_lm_config(corpus, root / "runs", steps=150, eval_every=75)
    cfg["train"]["optimizer"] = {"lr": 3e-3}
    (root / "lm.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = runner.invoke(app, ["pretrain", "--config", str(root / "lm.yaml"), "--name", "zh", "--no-progress"])
    assert out.exit_code == 0, out.output
    return root, out


def test_pretrain_prints_perplexity_and_the_bundle(lm_run):
    root, out = lm_run
    assert "perplexity=" in out.stdout and "bpc=" in out.stdout
    bundle = root / "runs" / "zh" / "v1"
    assert f"bundle:  {bundle}" in out.stdout
    assert yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))["task"] == "lm"
    info = json.loads(runner.invoke(app, ["info", str(bundle)]).stdout)
    assert info["task"] == "lm" and info["vocab_size"] == 300 and info["steps"] == 150


def test_generate_is_deterministic_with_a_seed_and_speaks_the_corpus(lm_run):
    root, _ = lm_run
    bundle = str(root / "runs" / "zh" / "v1")
    args = ["generate", bundle, "今天", "-n", "40", "--seed", "3", "--temperature", "0.7"]
    streamed = runner.invoke(app, args)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == runner.invoke(app, [*args, "--no-stream"]).stdout  # pieces join to the text
    api_text = largo.generate(bundle, "今天", 40, seed=3, temperature=0.7)
    assert streamed.stdout == api_text + "\n"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in api_text)  # Chinese characters came out whole
    assert largo.generate(bundle, "今天", 40, seed=4, temperature=0.7) != api_text


def test_bad_config_key_and_missing_corpus_are_one_line_errors(lm_run):
    root, _ = lm_run
    bad = runner.invoke(app, ["pretrain", "-c", str(root / "lm.yaml"), "--set", "model.presett=gpt-1m"])
    assert bad.exit_code == 2 and "model.presett: unknown key" in bad.output
    missing = runner.invoke(app, ["pretrain", str(root / "nope.txt")])
    assert missing.exit_code == 2 and "nope.txt: no such file or folder" in missing.output
    not_lm = runner.invoke(app, ["generate", str(root / "data"), "x"])
    assert not_lm.exit_code == 2 and "error:" in not_lm.output


@pytest.mark.slow
def test_a_killed_pretraining_run_resumes_from_its_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "data", lines=2000)
    cfg = tiny_lm_config(corpus, tmp_path / "runs", steps=600, eval_every=300, checkpoint_every=25)
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([*LARGO, "pretrain", "-c", "lm.yaml", "--no-progress"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    checkpoint = tmp_path / "runs" / "lm" / "v1" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert checkpoint.exists() and not (checkpoint.parent.parent / "model.safetensors").exists()
    out = subprocess.run([*LARGO, "pretrain", "-c", "lm.yaml", "--resume", "--no-progress"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    resumed_at = int(out.stderr.split("resumed from")[1].split("at step")[1].split()[0])
    assert 25 <= resumed_at < 600 and resumed_at % 25 == 0
    metrics = json.loads((checkpoint.parent.parent / "metrics.json").read_text())
    assert metrics["steps"] == 600 and [r["step"] for r in metrics["history"]] == [300, 600]


def test_bf16_generation_keeps_bf16_weights_and_follows_fp32(lm_run):
    root, _ = lm_run
    bundle = root / "runs" / "zh" / "v1"
    fp32, bf16 = largo.load(bundle), largo.load(bundle, precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([fp32.encode("今天天气")])
    with torch.no_grad():
        a, b = fp32.model(ids)[0, -1], bf16.model(ids)[0, -1].float()
    assert a.argmax() == b.argmax() and torch.allclose(a.softmax(-1), b.softmax(-1), atol=0.02)
    text = bf16.generate("今天", 30, seed=3, temperature=0.7)
    assert text and text == bf16.generate("今天", 30, seed=3, temperature=0.7)  # seeded in bf16 too
    out = runner.invoke(
        app,
        [
            "generate",
            str(bundle),
            "今天",
            "-n",
            "30",
            "--seed",
            "3",
            "--temperature",
            "0.7",
            "--precision",
            "bf16",
        ],
    )
    assert out.exit_code == 0 and out.stdout == text + "\n"
    bad = runner.invoke(app, ["generate", str(bundle), "今天", "--precision", "fp16"])
    assert bad.exit_code != 0 and "precision 'fp16'" in bad.output
