"""Feedback into the store: from the live server through StoreSink, from files, and the CLI verbs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from largo.cli import app as cli
from largo.data.readers import DataError
from largo.deploy.predictor import load_predictor
from largo.deploy.server import create_app
from largo.lifecycle.feedback import import_feedback
from largo.lifecycle.registry import Registry
from largo.lifecycle.sink import StoreSink
from largo.lifecycle.store import Store, feedback, predictions

pytestmark = pytest.mark.usefixtures("one_thread")
RECORD = {"x0": 5.1, "x1": 3.5, "x2": 1.4, "x3": 0.2}


def test_the_server_logs_to_the_store(store: Store, bundle: Path) -> None:
    version = Registry(store).register("iris", bundle)
    app = create_app(load_predictor(version.path, "torch"), sink=StoreSink(store, "iris", version.version))
    with TestClient(app) as client:
        answers = client.post("/predict", json=[RECORD, RECORD, RECORD]).json()
        ok = client.post("/feedback", json={"prediction_id": answers[0]["id"], "label": "virginica"})
    assert ok.status_code == 200
    logged = store.predictions_by_id([a["id"] for a in answers])
    assert len(logged) == 3 and logged[answers[0]["id"]]["input"] == RECORD
    assert logged[answers[0]["id"]]["output"]["species"] == answers[0]["species"]
    [fb] = store.feedback_rows("iris")
    assert (fb["prediction_id"], fb["label"], fb["source"]) == (answers[0]["id"], "virginica", "api")


def test_feedback_after_a_restart_is_found_in_the_store(store: Store, bundle: Path) -> None:
    version = Registry(store).register("iris", bundle)
    predictor = load_predictor(version.path, "torch")
    with TestClient(create_app(predictor, sink=StoreSink(store, "iris", version.version))) as client:
        answer = client.post("/predict", json=RECORD).json()
    # a new server process (nothing in memory) on the same store, and one serving another model
    with TestClient(create_app(predictor, sink=StoreSink(store, "iris", version.version))) as client:
        ok = client.post("/feedback", json={"prediction_id": answer["id"], "label": "virginica"})
        unknown = client.post("/feedback", json={"prediction_id": str(uuid.uuid4()), "label": "setosa"})
    with TestClient(create_app(predictor, sink=StoreSink(store, "other", 1))) as client:
        foreign = client.post("/feedback", json={"prediction_id": answer["id"], "label": "setosa"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["predicted"] == answer["species"]
    assert unknown.status_code == 404 and foreign.status_code == 404
    [fb] = store.feedback_rows("iris")
    assert (fb["prediction_id"], fb["label"]) == (answer["id"], "virginica")


def _log(store: Store, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    StoreSink(store, "iris", 1).log_predictions(
        [{"id": i, "time": 1.0, "inputs": RECORD, "outputs": {"species": "setosa"}} for i in ids]
    )
    return ids


def test_import_corrections_and_new_rows(store: Store, bundle: Path, tmp_path: Path) -> None:
    registry = Registry(store)
    registry.register("iris", bundle)
    ids = _log(store, 2)
    path = tmp_path / "corrections.csv"
    path.write_text(
        "prediction_id,x0,x1,x2,x3,label\n"
        f"{ids[0]},,,,,versicolor\n"
        f"{ids[1]},,,,,virginica\n"
        ",6.0,2.9,4.5,1.5,versicolor\n"
    )
    result = import_feedback(registry, "iris", path)
    assert (result.corrections, result.new_rows, result.version) == (2, 1, 1)
    rows = {r["prediction_id"]: r for r in store.feedback_rows("iris")}
    assert rows[ids[0]]["predicted"] == "setosa" and rows[ids[0]]["label"] == "versicolor"
    assert rows[None]["input"] == {"x0": 6.0, "x1": 2.9, "x2": 4.5, "x3": 1.5}
    assert {r["source"] for r in rows.values()} == {"import"}


def test_a_bad_file_imports_nothing_and_names_its_lines(store: Store, bundle: Path, tmp_path: Path) -> None:
    registry = Registry(store)
    registry.register("iris", bundle)
    [pid] = _log(store, 1)
    path = tmp_path / "bad.csv"
    unknown = str(uuid.uuid4())
    path.write_text(f"prediction_id,label\n{pid},versicolor\n{unknown},setosa\n{pid},tulip\n,setosa\n")
    with pytest.raises(DataError) as caught:
        import_feedback(registry, "iris", path)
    message = str(caught.value)
    assert "nothing imported" in message
    assert "line 4: label 'tulip' is not a class of 'species'" in message
    assert "line 5: no prediction_id, and the input columns ['x0', 'x1', 'x2', 'x3'] are missing" in message
    assert f"line 3: no prediction {unknown} of model 'iris'" in message
    assert store.count(feedback) == 0


def test_cli_registry_and_feedback(db_url: str, bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()

    def largo(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, [*args, "--db", db_url])
        assert result.exit_code == code, result.output
        return result.output

    assert "no registered models" in largo("registry", "list")
    assert "registered iris@1" in largo("registry", "add", "iris", str(bundle))
    assert "registered iris@2" in largo("registry", "add", "iris", str(bundle), "--parent", "1")
    assert "iris@production → 1" in largo("registry", "promote", "iris", "1")
    assert "iris@production → 2" in largo("registry", "promote", "iris", "2")
    assert "iris@candidate → 2" in largo("registry", "alias", "iris", "candidate", "2")
    assert "iris@production → 1" in largo("registry", "rollback", "iris")
    assert "versions=2" in largo("registry", "list") and "production=1" in largo("registry", "list")
    assert '"parent": 1' in largo("registry", "show", "iris")
    assert "unknown model 'nope'; registered models: iris" in largo("registry", "show", "nope", code=2)
    assert "has no version 9; versions: 1, 2" in largo("registry", "promote", "iris", "9", code=2)
    [pid] = _log(Store(db_url), 1)
    (tmp_path / "fb.csv").write_text(f"prediction_id,label\n{pid},virginica\n")
    out = largo("feedback", "import", "iris", str(tmp_path / "fb.csv"))
    assert "imported 1 corrections and 0 new labelled rows" in out
    assert Store(db_url).count(predictions) == 1
