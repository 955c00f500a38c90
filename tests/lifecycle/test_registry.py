"""The registry on both backends: register, resolve, immutability, aliases, promote and rollback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from largo.lifecycle.registry import BundleChangedError, Registry, RegistryError
from largo.lifecycle.store import Store


@pytest.fixture
def registry(store: Store) -> Registry:
    return Registry(store)


def test_register_list_show_resolve(registry: Registry, bundle: Path) -> None:
    v1 = registry.register("iris", bundle)
    v2 = registry.register("iris", bundle, parent=1, feedback_ids=["f1"])
    assert (v1.version, v2.version, v1.ref) == (1, 2, "iris@1")
    assert registry.names() == ["iris"]
    assert [v.version for v in registry.versions("iris")] == [1, 2]
    assert v1.path == bundle.resolve() and len(v1.files_hash) == 64
    assert "accuracy" in v1.metrics["test"]["species"] and "history" not in v1.metrics
    [train] = v1.lineage["data"]
    csv = Path(train["path"])
    assert train["split"] == "train" and train["sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert (v2.lineage["parent"], v2.lineage["feedback_ids"]) == (1, ["f1"])
    assert registry.resolve("iris@1") == registry.resolve("iris@v2") == bundle.resolve()
    with pytest.raises(RegistryError, match=r"no alias 'production' \(largo registry promote iris VERSION\)"):
        registry.resolve("iris")
    registry.promote("iris", 2)
    assert registry.lookup("iris").version == 2


def test_unknown_names_versions_and_aliases_name_the_known_ones(registry: Registry, bundle: Path) -> None:
    registry.register("iris", bundle)
    with pytest.raises(RegistryError, match="unknown model 'irs'; registered models: iris"):
        registry.resolve("irs")
    with pytest.raises(RegistryError, match="iris has no version 7; versions: 1"):
        registry.resolve("iris@7")
    registry.set_alias("iris", "candidate", 1)
    with pytest.raises(RegistryError, match="no alias 'staging'; aliases: candidate → 1; versions: 1"):
        registry.resolve("iris@staging")
    for bad in ("3", "v3", "a b", ""):
        with pytest.raises(RegistryError, match="bad alias"):
            registry.set_alias("iris", bad, 1)
    with pytest.raises(RegistryError, match="bad model name"):
        registry.register("a@b", bundle)
    with pytest.raises(RegistryError, match="not a bundle folder"):
        registry.register("iris", bundle / "nowhere")


def test_a_changed_bundle_is_detected_naming_the_files(registry: Registry, bundle: Path) -> None:
    registry.register("iris", bundle)
    (bundle / "serving").mkdir()
    (bundle / "serving" / "predictions.jsonl").write_text("{}\n")  # what serving writes: not hashed
    assert registry.resolve("iris@1") == bundle.resolve()
    state = json.loads((bundle / "preprocessors.json").read_text())
    (bundle / "preprocessors.json").write_text(json.dumps(state) + " ")
    (bundle / "model.onnx").write_bytes(b"new")
    with pytest.raises(BundleChangedError) as caught:
        registry.resolve("iris@1")
    message = str(caught.value)
    assert "iris@1" in message and "preprocessors.json changed" in message and "model.onnx added" in message
    assert "immutable" in message
    (bundle / "model.onnx").unlink()
    (bundle / "metrics.json").unlink()
    with pytest.raises(BundleChangedError, match="metrics.json missing"):
        registry.resolve("iris@1")
    assert registry.resolve("iris@1", verify=False) == bundle.resolve()


def test_promote_and_rollback_walk_back_through_the_history(registry: Registry, bundle: Path) -> None:
    for _ in range(3):
        registry.register("iris", bundle)
    with pytest.raises(RegistryError, match="nothing to roll back to.*never set"):
        registry.rollback("iris")
    for v in (1, 2, 3):
        registry.promote("iris", v)
    registry.set_alias("iris", "candidate", 3)
    assert registry.aliases("iris") == {"candidate": 3, "production": 3}
    assert registry.rollback("iris").version == 2
    assert registry.rollback("iris").version == 1
    with pytest.raises(RegistryError, match="nothing to roll back to.*points at version 1"):
        registry.rollback("iris")
    registry.promote("iris", 3)
    assert registry.rollback("iris").version == 1  # back to what production was before 3
    assert registry.aliases("iris") == {"candidate": 3, "production": 1}
    actions = [(h["alias"], h["version"], h["action"]) for h in registry.history("iris")]
    assert actions[-2:] == [("production", 3, "set"), ("production", 1, "rollback")]
