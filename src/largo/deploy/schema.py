"""Request parsing for the server: a pydantic model built from the bundle's input features.

`record_model()` gives clients (and /openapi.json) each input's column name and type; `parse_records()`
turns a JSON or multipart body into validated records keyed by column, with base64 images decoded to
bytes. Every problem is an `InputError` whose `errors` name the record and the field, FastAPI-style.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

_TYPES: dict[str, tuple[Any, str]] = {
    "number": (float | None, "A number; null is filled like a missing value in training."),
    "category": (str | int | float | None, "A category value; unseen values go to the unknown bucket."),
    "text": (str | None, "A text; null or empty is predicted as an empty text."),
    "image": (str, "An image file (png, jpeg, ...) as base64, or a data: URL; or a file part in multipart."),
}


class InputError(ValueError):
    """Invalid request input; `errors` are FastAPI-style dicts with loc, msg and type."""

    def __init__(self, errors: list[dict[str, Any]], status_code: int = 422):
        self.errors = errors
        self.status_code = status_code  # 413 for too many records, else 422
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def _error(loc: Sequence[Any], msg: str, kind: str = "value_error") -> InputError:
    return InputError([{"loc": ["body", *loc], "msg": msg, "type": kind}])


class _RecordBase(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=False)


def record_model(inputs: Sequence[Any], title: str = "Record") -> type[BaseModel]:
    """A pydantic model with one required field per input feature, named by its column (`source`).

    The feature name is accepted too, as the predictor does. Extra keys are ignored (a CSV row with its
    label column is fine); a missing key is an error (null is allowed, absence is not).
    """
    fields: dict[str, Any] = {}
    for i, f in enumerate(inputs):
        kind, about = _TYPES[f.type]
        names = [f.source] if f.source == f.name else [f.source, f.name]
        fields[f"f{i}"] = (
            kind,
            Field(
                ..., alias=f.source, validation_alias=AliasChoices(*names), description=f"{f.type}: {about}"
            ),
        )
    return create_model(title, __base__=_RecordBase, **fields)


def _decode_image(value: str, loc: list[Any]) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _error(loc, "not valid base64 image data") from None
    _check_image(data, loc)
    return data


def _check_image(data: bytes, loc: list[Any]) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _error(loc, f"cannot decode the image: {exc}") from None


class RecordParser:
    """Validates request bodies against a model's inputs."""

    def __init__(self, inputs: Sequence[Any], max_records: int):
        self.inputs = list(inputs)
        self.model = record_model(self.inputs)
        self.one = TypeAdapter(self.model)
        self.many = TypeAdapter(list[self.model])  # type: ignore[name-defined]
        self.max_records = max_records
        self.images = [f.source for f in self.inputs if f.type == "image"]
        self.texts = [f.source for f in self.inputs if f.type == "text"]
        only_text = len(self.inputs) == 1 and self.inputs[0].type == "text"
        self.text_source = self.inputs[0].source if only_text else None

    def from_json(self, body: bytes) -> tuple[list[dict[str, Any]], bool]:
        """A JSON body (a record, a list of records, or for one-text models strings) → (records, single)."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _error([], f"the body is not valid JSON: {exc}", "json_invalid") from None
        if self.text_source and (
            isinstance(data, str)
            or (isinstance(data, list) and data and all(isinstance(t, str) for t in data))
        ):
            single = isinstance(data, str)
            data = {self.text_source: data} if single else [{self.text_source: t} for t in data]
        return self.validate(data)

    def from_form(self, form: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """A multipart or urlencoded form with one record: files for images, fields for the rest."""
        raw: dict[str, Any] = {}
        for f in self.inputs:
            key = f.source if f.source in form else f.name
            if key not in form:
                continue
            value = form[key]
            if hasattr(value, "file"):  # an upload: raw image bytes, sent on as base64 like JSON's
                value = base64.b64encode(value.file.read()).decode("ascii")
            elif f.type in ("number", "category") and value == "":
                value = None
            raw[f.source] = value
        return self.validate(raw)

    def validate(self, data: Any) -> tuple[list[dict[str, Any]], bool]:
        """A record or a list of records → validated records keyed by column, images as bytes."""
        single = isinstance(data, dict)
        if not single and not isinstance(data, list):
            raise _error(
                [], f"expected a record (JSON object) or a list of records, got {type(data).__name__}"
            )
        if not single and not data:
            raise _error([], "the list of records is empty")
        if not single and len(data) > self.max_records:
            msg = f"{len(data)} records in one request; at most {self.max_records}"
            raise InputError([{"loc": ["body"], "msg": msg, "type": "too_many_records"}], 413)
        try:
            parsed = [self.one.validate_python(data)] if single else self.many.validate_python(data)
        except ValidationError as exc:
            errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            raise InputError(errors) from None
        records = [p.model_dump(by_alias=True) for p in parsed]
        for i, record in enumerate(records):
            for source in self.images:
                loc = [source] if single else [i, source]
                record[source] = _decode_image(record[source], loc)
        return records, single

    def length(self, record: Mapping[str, Any]) -> int:
        """Characters in a record's texts: the batcher groups records of similar length."""
        return sum(len(record[s] or "") for s in self.texts)


def loggable(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record for the prediction log: image bytes become their size and SHA-256."""
    import hashlib

    out = {}
    for k, v in record.items():
        if isinstance(v, bytes | bytearray):
            out[k] = {"image_bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
        else:
            out[k] = v
    return out
