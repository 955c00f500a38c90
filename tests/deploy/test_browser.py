"""The page at `/` in a real browser: headless Chromium loads it from a live server, the page fills its
form from the URL query, submits it, shows the label and sends feedback; the test reads the final DOM.

Chromium is the Debian package `chromium` (`make test` installs it when missing). `--dump-dom` with a
virtual-time budget prints the DOM once the page's fetches have finished, so no driver is needed.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest

import largo
from largo.data.samples import news_rows
from largo.deploy.server import create_app, serve_in_thread
from tests.lm_corpus import tiny_lm_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def news_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("news")
    rows = news_rows(600, seed=5)
    (root / "news.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return largo.train(
        {
            "name": "news",
            "runs_dir": str(root / "runs"),
            "data": {"train": str(root / "news.jsonl"), "valid": 0.15, "test": None},
            "inputs": [{"name": "text", "type": "text", "tokenizer": {"kind": "char"}, "encoder": "bag"}],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [32]},
            "train": {
                "epochs": 5,
                "batch_size": 32,
                "optimizer": {"name": "adam", "lr": 3e-3},
                "progress": False,
            },
        }
    ).path


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts and fetches ran (virtual time waits for the network)."""
    if BROWSER is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    args = [BROWSER, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def element(dom: str, element_id: str) -> str:
    """The text of the element with this id (a leaf element)."""
    m = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    assert m, f"no element #{element_id} in the page:\n{dom[-3000:]}"
    return html.unescape(m.group(1))


def test_the_page_predicts_a_typed_text_and_sends_feedback(news_bundle: Path, tmp_path: Path) -> None:
    predictor = largo.load(news_bundle)
    text = "足球 比赛 冠军 球员 教练"
    expected = predictor.predict({"text": text})["label"]
    truth = next(label for label in predictor.labels["label"] if label != expected)
    with serve_in_thread(create_app(predictor)) as url:
        query = urlencode({"text": text, "submit": 1, "feedback": truth})
        dom = dump_dom(f"{url}/?{query}", tmp_path / "profile")
    assert element(dom, "error") == ""
    assert 'data-state="done"' in dom
    assert element(dom, "label-label") == expected  # the label the page shows
    assert dom.count('class="bar"') == len(predictor.labels["label"])  # one bar per class
    assert f"Saved: {truth}" in dom
    rows = (news_bundle / "serving" / "feedback.jsonl").read_text(encoding="utf-8").splitlines()
    feedback = json.loads(rows[-1])
    assert feedback["label"] == truth and feedback["predicted"] == expected


def test_the_page_shows_a_clear_error(news_bundle: Path, tmp_path: Path) -> None:
    with serve_in_thread(create_app(largo.load(news_bundle), api_key="secret")) as url:
        dom = dump_dom(f"{url}/?text=hello&submit=1", tmp_path / "profile")
    assert 'data-state="error"' in dom
    assert element(dom, "error").startswith("401 missing or wrong API key")


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT pretrained on the tests' small English and Chinese corpus."""
    root = tmp_path_factory.mktemp("lm")
    return largo.pretrain(tiny_lm_config(write_corpus(root, lines=1500), root / "runs")).path


def test_the_lm_page_generates_and_sends_a_correction(lm_bundle: Path, tmp_path: Path) -> None:
    """`stream=0`: headless Chromium's virtual time does not wait for a streamed body (the dump came
    mid-stream in about half the runs), so the page takes the JSON answer here; SSE is tested over HTTP
    in test_generate_server.py."""
    from largo.deploy.generate_service import create_generate_app
    from largo.deploy.generator import TextGenerator

    with serve_in_thread(create_generate_app(TextGenerator.load(lm_bundle))) as url:
        query = urlencode(
            {
                "prompt": "The quick",
                "max_new_tokens": 12,
                "stream": 0,
                "submit": 1,
                "completion": " brown fox",
            }
        )
        dom = dump_dom(f"{url}/?{query}", tmp_path / "profile")
    assert element(dom, "error") == ""
    state = re.search(r'id="out" data-state="(\w+)"', dom)
    assert state and state.group(1) == "done", dom[-3000:]
    assert element(dom, "saved") == "Saved: correction"
    generated = json.loads((lm_bundle / "serving" / "predictions.jsonl").read_text().splitlines()[-1])
    assert generated["inputs"]["prompt"] == "The quick" and generated["outputs"]["tokens"] > 0
    assert re.search(r'id="out"[^>]*><b>The quick</b>', dom)  # the prompt, then the generated text
    assert html.escape(generated["outputs"]["text"], quote=False) in dom
    fb = json.loads((lm_bundle / "serving" / "feedback.jsonl").read_text().splitlines()[-1])
    assert fb["prediction_id"] == generated["id"] and fb["label"]["completion"] == " brown fox"
    assert fb["predicted"] == generated["outputs"]["text"]
