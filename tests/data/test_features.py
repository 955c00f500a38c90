"""Tests for largo.data.features and largo.data.infer: exact scaling, vocabularies, images, state."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from largo.config import CategoryFeatureConfig, ImageFeatureConfig, NumberFeatureConfig
from largo.data.features import (
    NUMBERS,
    UNKNOWN,
    CategoryProcessor,
    ImageProcessor,
    NumberProcessor,
    encode_inputs,
    make_processor,
    processor_from_state,
)
from largo.data.infer import infer_features, infer_target_type
from largo.data.readers import DataError

RAW = [1.0, None, 3.0, 5.0, 6.0]
SEEN = np.array([1.0, 3.0, 5.0, 6.0])  # the non-missing values of RAW


def fitted_number(**kwargs) -> NumberProcessor:
    proc = NumberProcessor(NumberFeatureConfig(name="x", **kwargs))
    proc.fit(pa.chunked_array([RAW]))
    return proc


# ------------------------------------------------------------------------------------------ numbers


def test_number_stats_ignore_missing():
    proc = fitted_number()
    assert proc.stats["mean"] == pytest.approx(SEEN.mean())
    assert proc.stats["std"] == pytest.approx(np.sqrt(((SEEN - SEEN.mean()) ** 2).mean()))
    assert proc.stats["min"] == 1.0 and proc.stats["max"] == 6.0
    assert proc.stats["median"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("normalization", "fill", "expected_missing"),
    [
        ("standard", "mean", 0.0),  # the mean standardizes to 0
        ("standard", "median", (4.0 - 3.75) / np.sqrt(3.6875)),
        ("minmax", "mean", (3.75 - 1.0) / 5.0),
        ("minmax", "median", (4.0 - 1.0) / 5.0),
        ("none", "zero", 0.0),
        ("none", "constant", -7.0),
        ("minmax", "constant", (-7.0 - 1.0) / 5.0),
    ],
)
def test_number_scaling_and_fill(normalization, fill, expected_missing):
    proc = fitted_number(normalization=normalization, fill=fill, fill_value=-7.0)
    out = proc.encode(pa.chunked_array([RAW]))
    assert out.dtype == torch.float32 and out.shape == (5,)
    known = np.array([1.0, 3.0, 5.0, 6.0])
    if normalization == "standard":
        want = (known - 3.75) / np.sqrt(3.6875)
    elif normalization == "minmax":
        want = (known - 1.0) / 5.0
    else:
        want = known
    np.testing.assert_allclose(out.numpy()[[0, 2, 3, 4]], want, rtol=1e-6)
    assert out[1].item() == pytest.approx(expected_missing, abs=1e-6)


def test_number_accepts_python_lists_strings_and_booleans():
    proc = fitted_number(normalization="none")
    assert proc.encode(["2.5", " ", None, 4]).tolist() == pytest.approx([2.5, 3.75, 3.75, 4.0])
    assert proc.to_float(pa.chunked_array([[True, False, None]]))[:2].tolist() == [1.0, 0.0]


def test_number_non_numeric_names_feature_and_row():
    proc = fitted_number()
    with pytest.raises(DataError) as info:
        proc.encode(["1", "2", "abc"])
    message = str(info.value)
    assert "'x'" in message and "'abc'" in message and "row 3" in message
    empty = NumberProcessor(NumberFeatureConfig(name="empty"))
    with pytest.raises(DataError, match="'empty'"):
        empty.fit(pa.chunked_array([[None, None]], type=pa.float64()))


@pytest.mark.parametrize("normalization", ["standard", "minmax", "none"])
def test_unscale_inverts_scale(normalization):
    proc = fitted_number(normalization=normalization)
    x = np.array([-3.0, 0.0, 2.5, 100.0])
    np.testing.assert_allclose(proc.unscale(proc.scale(x)), x, rtol=1e-12, atol=1e-12)


def test_constant_column_does_not_divide_by_zero():
    proc = NumberProcessor(NumberFeatureConfig(name="c"))
    proc.fit(pa.chunked_array([[2.0, 2.0, 2.0]]))
    assert proc.encode([2.0, 3.0]).tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------------------- categories


def fitted_category(values, is_output=False, **kwargs) -> CategoryProcessor:
    proc = CategoryProcessor(CategoryFeatureConfig(name="c", **kwargs), is_output)
    proc.fit(pa.chunked_array([values]))
    return proc


def test_category_input_has_unknown_bucket_zero():
    proc = fitted_category(["b", "a", "b", "c"])
    assert proc.vocab == [UNKNOWN, "a", "b", "c"]
    assert proc.size == 4
    ids = proc.encode(["a", "c", "never seen", None, "b"])
    assert ids.dtype == torch.int64
    assert ids.tolist() == [1, 3, 0, 0, 2]


def test_category_min_count_and_max_size():
    values = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]
    assert fitted_category(values, min_count=2).vocab == [UNKNOWN, "a", "b", "c"]
    assert fitted_category(values, min_count=3).encode(["c", "b"]).tolist() == [0, 2]
    assert fitted_category(values, max_size=2).vocab == [UNKNOWN, "a", "b"]
    assert fitted_category(values, min_count=3, max_size=1).vocab == [UNKNOWN, "a"]


def test_category_output_rejects_unseen_labels():
    proc = fitted_category(["cat", "dog", "cat"], is_output=True)
    assert proc.vocab == ["cat", "dog"]  # no unknown bucket for an output
    assert proc.encode(["dog", "cat"]).tolist() == [1, 0]
    with pytest.raises(DataError) as info:
        proc.encode(["cat", "bird", "fish"])
    message = str(info.value)
    assert "'bird'" in message and "'fish'" in message and "'c'" in message
    assert "cat" in message and "dog" in message  # the known labels are listed


def test_category_int_and_float_are_the_same_class():
    proc = fitted_category([3, 3.0, 4.0, 4], is_output=True)
    assert proc.vocab == ["3", "4"]
    assert proc.encode([3.0, 4, "3"]).tolist() == [0, 1, 0]
    floats = fitted_category(pa.array([3.0, 4.0, 3.5]), is_output=True)
    assert floats.vocab == ["3", "3.5", "4"]


def test_category_natural_sort_of_numeric_labels():
    proc = fitted_category(["10", "2", "1", "b", "a", "2"], is_output=True)
    assert proc.vocab == ["1", "2", "10", "a", "b"]


def test_category_vocab_does_not_depend_on_row_order():
    values = ["2", "nan", "10", "x", "1"]
    vocabs = {
        tuple(fitted_category(order).vocab) for order in (values, values[::-1], values[2:] + values[:2])
    }
    assert len(vocabs) == 1


# ------------------------------------------------------------------------------------------- images


def write_png(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def gray_images(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 4), dtype=np.uint8) for _ in range(3)]
    paths = [write_png(tmp_path / f"g{i}.png", a) for i, a in enumerate(arrays)]
    return arrays, paths


def test_image_grayscale_keeps_pixels_and_learns_stats(gray_images):
    arrays, paths = gray_images
    proc = ImageProcessor(ImageFeatureConfig(name="img"))
    proc.fit(pa.chunked_array([paths]))
    assert proc.shape == (1, 6, 4)  # channels detected, size = the first image's [h, w]
    out = proc.encode(paths)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 6, 4)
    assert torch.equal(out[:, 0], torch.from_numpy(np.stack(arrays)))
    pixels = np.stack(arrays).astype(np.float64) / 255.0
    assert proc.stats["mean"] == pytest.approx([pixels.mean()], rel=1e-5)
    assert proc.stats["std"] == pytest.approx([pixels.std(ddof=1)], rel=1e-4)


def test_image_rgb_resize_relative_paths_and_bytes(tmp_path):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
    write_png(tmp_path / "rgb.png", big)
    proc = ImageProcessor(ImageFeatureConfig(name="img", size=(8, 5)), base_dir=str(tmp_path))
    proc.fit(pa.chunked_array([["rgb.png"]]))
    assert proc.shape == (3, 8, 5)
    out = proc.encode(["rgb.png"])
    assert out.shape == (1, 3, 8, 5)
    want = np.asarray(Image.fromarray(big).resize((5, 8), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(out[0], torch.from_numpy(want.copy()))
    data = (tmp_path / "rgb.png").read_bytes()
    assert torch.equal(proc.encode([data]), out)
    # a grayscale image fed to an RGB feature is converted, not rejected
    write_png(tmp_path / "gray.png", np.full((20, 10), 77, dtype=np.uint8))
    gray = proc.encode([str(tmp_path / "gray.png")])
    assert gray.shape == (1, 3, 8, 5) and bool((gray == 77).all())


def test_image_channels_from_config(gray_images):
    _, paths = gray_images
    proc = ImageProcessor(ImageFeatureConfig(name="img", channels=3))
    proc.fit(pa.chunked_array([paths]))
    out = proc.encode(paths[:1])
    assert out.shape == (1, 3, 6, 4)
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])


def test_image_missing_file_and_garbage(tmp_path, gray_images):
    _, paths = gray_images
    proc = ImageProcessor(ImageFeatureConfig(name="img"))
    proc.fit(pa.chunked_array([paths]))
    with pytest.raises(DataError) as info:
        proc.encode([paths[0], str(tmp_path / "nope.png")])
    assert "'img'" in str(info.value) and "nope.png" in str(info.value)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        proc.encode([str(tmp_path / "bad.png")])
    with pytest.raises(DataError, match="'img'"):
        proc.encode([b"garbage bytes"])
    with pytest.raises(DataError, match="'img'"):
        proc.encode([None])


# ------------------------------------------------------------------------------------ batches/state


def test_encode_inputs_stacks_numbers_in_config_order():
    configs = [
        NumberFeatureConfig(name="b", normalization="none"),
        CategoryFeatureConfig(name="c"),
        NumberFeatureConfig(name="a", normalization="minmax"),
    ]
    columns = {"a": [0.0, 10.0, 5.0], "b": [7.0, 8.0, 9.0], "c": ["x", "y", "x"]}
    processors = {}
    for cfg in configs:
        processors[cfg.name] = make_processor(cfg, is_output=False)
        processors[cfg.name].fit(pa.chunked_array([columns[cfg.name]]))
    batch = encode_inputs(columns, configs, processors)
    assert set(batch) == {NUMBERS, "c"}
    assert batch[NUMBERS].shape == (3, 2) and batch[NUMBERS].dtype == torch.float32
    assert batch[NUMBERS][:, 0].tolist() == [7.0, 8.0, 9.0]  # b comes first, as in the config
    assert batch[NUMBERS][:, 1].tolist() == [0.0, 1.0, 0.5]
    assert batch["c"].tolist() == [1, 2, 1]


def test_state_round_trip_gives_identical_encodings(tmp_path, gray_images):
    _, paths = gray_images
    columns = {
        "n": [1.5, None, -2.0, 8.0],
        "c": ["p", "q", None, "p"],
        "y": ["lo", "hi", "hi", "lo"],
        "img": paths + paths[:1],
    }
    features = [
        (NumberFeatureConfig(name="n", normalization="minmax", fill="median"), False),
        (CategoryFeatureConfig(name="c"), False),
        (CategoryFeatureConfig(name="y"), True),
        (ImageFeatureConfig(name="img", size=(3, 3)), False),
    ]
    for cfg, is_output in features:
        proc = make_processor(cfg, is_output)
        proc.fit(pa.chunked_array([columns[cfg.name]]))
        state = json.loads(json.dumps(proc.state()))  # what preprocessors.json holds
        again = processor_from_state(cfg, is_output, state)
        assert type(again) is type(proc)
        assert torch.equal(again.encode(columns[cfg.name]), proc.encode(columns[cfg.name])), cfg.name
        unseen = {"n": [42.0], "c": ["zzz"], "y": ["hi"], "img": paths[1:2]}[cfg.name]
        assert torch.equal(again.encode(unseen), proc.encode(unseen)), cfg.name


# ------------------------------------------------------------------------------------------- infer


def test_infer_features_on_a_small_table():
    n = 60
    table = pa.table(
        {
            "age": pa.array([20 + i % 30 for i in range(n)]),
            "height": pa.array([1.5 + i / 100 for i in range(n)]),
            "city": pa.array([["paris", "rome", "oslo"][i % 3] for i in range(n)]),
            "photo": pa.array([f"img/{i}.PNG" for i in range(n)]),
            "user_id": pa.array([f"u{i:04d}" for i in range(n)]),
            "empty": pa.array([None] * n, type=pa.string()),
            "label": pa.array([["yes", "no"][i % 2] for i in range(n)]),
        }
    )
    inferred = infer_features(table, ["label"])
    types = {f["name"]: f["type"] for f in inferred.inputs}
    assert types == {"age": "number", "height": "number", "city": "category", "photo": "image"}
    assert list(types) == ["age", "height", "city", "photo"]  # table order is kept
    assert inferred.outputs == [{"name": "label", "type": "category"}]
    assert set(inferred.skipped) == {"user_id", "empty"}
    assert "missing" in inferred.skipped["empty"]
    with pytest.raises(ValueError, match="nope"):
        infer_features(table, ["nope"])


def test_infer_target_type():
    assert infer_target_type(pa.chunked_array([[0.5, 1.25, 3.0, 2.0]])) == "number"
    assert infer_target_type(pa.chunked_array([[0, 1, 2, 1, None]])) == "category"
    assert infer_target_type(pa.chunked_array([[0.0, 1.0, None, 1.0]])) == "category"  # ints read as floats
    assert infer_target_type(pa.chunked_array([list(range(100))])) == "number"  # many distinct ints
    assert infer_target_type(pa.chunked_array([[float(i) for i in range(100)]])) == "number"
    assert infer_target_type(pa.chunked_array([["a", "b"]])) == "category"
    assert infer_target_type(pa.chunked_array([[True, False]])) == "category"


def test_bytes_io_png_round_trip_matches_path(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    proc = ImageProcessor(ImageFeatureConfig(name="img"))
    proc.fit([buf.getvalue()])
    assert proc.shape == (1, 3, 4)
    assert torch.equal(proc.encode([buf.getvalue()])[0, 0], torch.from_numpy(arr))
