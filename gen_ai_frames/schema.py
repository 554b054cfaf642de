"""Structured output: a schema in, typed columns out.

A schema is given as a pydantic model class, a JSON Schema dict, or a short string::

    "name, age int, score float, tags list[str], sentiment positive|negative|neutral"

The short grammar: fields separated by commas (or by newlines, which lets descriptions hold
commas); each field is ``NAME [TYPE] [: description]`` where TYPE is ``str`` (the default),
``int``, ``float``, ``bool``, ``list[TYPE]`` or an enum written ``a|b|c``.

:class:`Schema` turns any of these into one canonical JSON Schema (what providers are sent and what
checkpoints fingerprint), validates answers against it and builds one typed pandas column per
top-level field: integer -> ``Int64``, number -> ``Float64``, boolean -> ``boolean``, string ->
``string``, enum -> ``category`` with exactly the enum's values, arrays and objects -> Arrow-backed
list and struct columns.

>>> schema = Schema.parse("name, age int, mood happy|sad")
>>> schema.validate('{"name": "Ada", "age": 36, "mood": "happy"}')
{'name': 'Ada', 'age': 36, 'mood': 'happy'}
>>> schema.validate('{"name": "Ada", "age": "36", "mood": "happy"}')
Traceback (most recent call last):
...
gen_ai_frames.schema.SchemaMismatch: at 'age': '36' is not of type 'integer'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Schema",
    "SchemaMismatch",
    "classify_instruction",
    "extraction_schema",
    "labels_schema",
    "parse_short_schema",
]

try:  # ~3x faster than json for the many small answers of a run
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is a dependency
    _loads = json.loads  # type: ignore[assignment]

_SCALARS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaMismatch(ValueError):
    """An answer that is not valid JSON, or breaks the schema; the message says where and how."""


def parse_short_schema(text: str) -> dict[str, Any]:
    """The JSON Schema of a short schema string.

    >>> parse_short_schema("name, tags list[str]: keywords")["properties"]["tags"]
    {'type': 'array', 'items': {'type': 'string'}, 'description': 'keywords'}
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError("schema must not be empty: write fields like 'name, age int, score float'")
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    properties: dict[str, Any] = {}
    for part in (p.strip() for p in parts):
        if not part:
            continue
        head, _, description = part.partition(":")
        words = head.split()
        if not words or len(words) > 2 or not _NAME.match(words[0]):
            raise ConfigurationError(
                f"schema field {part!r} is not 'NAME [TYPE] [: description]'; types are str, int, float, "
                "bool, list[TYPE] and enums like a|b|c"
            )
        name = words[0]
        if name in properties:
            raise ConfigurationError(f"schema field {name!r} appears twice")
        prop = _short_type(words[1] if len(words) == 2 else "str", part)
        if description.strip():
            prop["description"] = description.strip()
        properties[name] = prop
    return _object(properties)


def extraction_schema(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of ``df.genai.extract``: each field a description (text), a type, or both.

    Every field may be null: a text need not mention it.

    >>> properties = extraction_schema({"company": "the company named", "year": int})["properties"]
    >>> properties["company"], properties["year"]
    ({'type': ['string', 'null'], 'description': 'the company named'}, {'type': ['integer', 'null']})
    """
    if not isinstance(fields, Mapping) or not fields:
        raise ConfigurationError(
            f"fields must be a non-empty dict like {{'company': 'the company named', "
            f"'year': int}}, got {fields!r}"
        )
    properties = {}
    for name, spec in fields.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(f"field name {name!r} must be an identifier (letters, digits, _)")
        kind, description = (
            spec
            if isinstance(spec, tuple) and len(spec) == 2
            else (str, spec)
            if isinstance(spec, str)
            else (spec, None)
        )
        prop = _python_type(kind, name)
        if prop.get("type") != "array":
            prop["type"] = [prop["type"], "null"]
        if description:
            prop["description"] = str(description)
        properties[name] = prop
    return _object(properties)


def _python_type(kind: Any, name: str) -> dict[str, Any]:
    import typing

    scalars = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if kind in scalars:
        return {"type": scalars[kind]}
    if typing.get_origin(kind) is list and len(typing.get_args(kind)) == 1:
        return {"type": "array", "items": _python_type(typing.get_args(kind)[0], name)}
    raise ConfigurationError(
        f"field {name!r}: give a description (text) or a type (str, int, float, bool, "
        f"list[str]), got {kind!r}"
    )


def _short_type(word: str, part: str) -> dict[str, Any]:
    if word in _SCALARS:
        return dict(_SCALARS[word])
    if word.startswith("list[") and word.endswith("]"):
        return {"type": "array", "items": _short_type(word[5:-1], part)}
    if "|" in word:
        values = word.split("|")
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ConfigurationError(f"enum {word!r} in schema field {part!r} has an empty or repeated value")
        return {"type": "string", "enum": values}
    raise ConfigurationError(
        f"unknown type {word!r} in schema field {part!r}: use str, int, float, bool, "
        "list[TYPE] or an enum like a|b|c"
    )


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    # Every field required and no others: what OpenAI's strict mode asks, and what makes columns total.
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _inline_refs(schema: Any, definitions: Mapping[str, Any], depth: int = 0) -> Any:
    """pydantic puts nested models under ``$defs`` and points at them: inline them so every
    provider (and the column types) see one self-contained schema."""
    if depth > 32:
        raise ConfigurationError("schema is recursive; structured output needs a finite schema")
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in definitions:
                raise ConfigurationError(f"schema refers to {schema['$ref']!r}, which it does not define")
            return _inline_refs(definitions[name], definitions, depth + 1)
        return {k: _inline_refs(v, definitions, depth + 1) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, definitions, depth + 1) for v in schema]
    return schema


@dataclass(frozen=True)
class Schema:
    """A validated structured-output schema. Build it with :meth:`parse`.

    >>> Schema.parse({"type": "object", "properties": {"n": {"type": "integer"}}}).fields
    ['n']
    """

    json_schema: dict[str, Any]
    model: Any = None  # the pydantic model class, when one was given
    name: str = "answer"

    @classmethod
    def parse(cls, spec: Any) -> Schema:
        """A Schema from a pydantic model class, a JSON Schema dict, a short string, or a Schema."""
        if isinstance(spec, Schema):
            return spec
        if isinstance(spec, str):
            return cls(parse_short_schema(spec))
        if isinstance(spec, Mapping):
            schema = _inline_refs(dict(spec), spec.get("$defs", {}))
            return cls(_checked_object(schema, "the JSON Schema"), name=_safe_name(spec.get("title")))
        if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
            raw = spec.model_json_schema()
            schema = _inline_refs(raw, raw.get("$defs", {}))
            return cls(
                _checked_object(schema, f"model {spec.__name__}"), model=spec, name=_safe_name(spec.__name__)
            )
        raise ConfigurationError(
            f"schema must be a pydantic model class, a JSON Schema dict or a string like 'name, age int', "
            f"got {type(spec).__name__}"
        )

    @property
    def fields(self) -> list[str]:
        """Top-level field names, in order: one output column each."""
        return list(self.json_schema["properties"])

    def canonical(self) -> str:
        """The schema as stable text: part of a checkpoint's fingerprint and of cache keys."""
        return json.dumps(self.json_schema, sort_keys=True, separators=(",", ":"))

    @cached_property
    def _validator(self) -> Any:
        import jsonschema

        return jsonschema.Draft202012Validator(self.json_schema)

    @cached_property
    def _fast_check(self) -> Any:
        """A validator compiled to Python code: ~10x less CPU per answer than jsonschema's, which
        only explains the (rare) answers this one rejects. None where it cannot compile the schema."""
        import fastjsonschema

        try:
            return fastjsonschema.compile(self.json_schema)
        except fastjsonschema.JsonSchemaDefinitionException:
            return None

    def validate(self, text: str) -> dict[str, Any]:
        """The answer's parsed object; a :class:`SchemaMismatch` saying what is wrong otherwise."""
        try:
            value = _loads(text)
        except (TypeError, ValueError) as err:
            preview = text if len(text) <= 60 else text[:57] + "..."
            raise SchemaMismatch(f"the answer is not valid JSON ({err}): {preview!r}") from None
        if self._fast_check is not None:
            try:
                self._fast_check(value)
                return value
            except ValueError:  # fastjsonschema's JsonSchemaValueException: say why, below
                pass
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            raise SchemaMismatch(f"at {where!r}: {error.message}" if where else error.message)
        return value

    def instance(self, value: dict[str, Any]) -> Any:
        """The value the client returns: a model instance for a pydantic schema, else the dict."""
        return value if self.model is None else self.model.model_validate(value)

    # Columns ----------------------------------------------------------------------------------

    def dtypes(self) -> dict[str, Any]:
        """The pandas dtype of each field's column."""
        return {name: _dtype(prop) for name, prop in self.json_schema["properties"].items()}

    def columns_from_answers(
        self, answers: Sequence[str | None]
    ) -> dict[str, pd.api.extensions.ExtensionArray]:
        """:meth:`columns` of raw answers (valid JSON, as a run stores them; None for failed rows).

        >>> schema = Schema.parse("n int")
        >>> schema.columns_from_answers(['{"n": 3}', None])["n"].tolist()
        [3, <NA>]
        """
        return self.columns([None if text is None else _loads(text) for text in answers])

    def arrow_types(self) -> dict[str, Any]:
        """The Arrow type of each field's column in output files (enums as dictionaries).

        >>> Schema.parse("n int, mood a|b").arrow_types()["mood"]
        DictionaryType(dictionary<values=string, indices=int32, ordered=0>)
        """
        import pyarrow as pa

        types = {}
        for name, prop in self.json_schema["properties"].items():
            if "enum" in prop:
                types[name] = pa.dictionary(pa.int32(), pa.string())
            else:
                types[name] = _arrow_type(prop)
        return types

    def arrow_columns_from_answers(self, answers: Sequence[str | None]) -> dict[str, Any]:
        """One Arrow array per field, of :meth:`arrow_types`, from raw answers (None: a failed row).

        >>> schema = Schema.parse("n int, mood a|b")
        >>> columns = schema.arrow_columns_from_answers(['{"n": 3, "mood": "b"}', None])
        >>> columns["n"].to_pylist(), columns["mood"].type
        ([3, None], DictionaryType(dictionary<values=string, indices=int32, ordered=0>))
        """
        import pyarrow as pa

        values = [None if text is None else _loads(text) for text in answers]
        out = {}
        for name, kind in self.arrow_types().items():
            cells = [None if v is None else v.get(name) for v in values]
            try:
                out[name] = pa.array(cells, type=kind)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                out[name] = pa.array(_coerced(cells, kind), type=kind)
        return out

    def polars_dtypes(self) -> dict[str, Any]:
        """The polars dtype of each field's column: ``pl.Enum`` with exactly the enum's values
        (inside lists and structs too), Int64, Float64, Boolean, String, List and Struct.

        >>> Schema.parse("n int, mood a|b, tags list[x|y]").polars_dtypes()["tags"]
        List(Enum(categories=['x', 'y']))
        """
        return {name: _polars_dtype(prop) for name, prop in self.json_schema["properties"].items()}

    def columns(self, values: Sequence[dict[str, Any] | None]) -> dict[str, pd.api.extensions.ExtensionArray]:
        """One typed column per field from parsed answers (None, or a missing field, gives NA)."""
        import pandas as pd

        out = {}
        for name, dtype in self.dtypes().items():
            cells = [None if v is None else v.get(name) for v in values]
            out[name] = pd.array(cells, dtype=dtype)
        return out


def _safe_name(title: Any) -> str:
    """A name providers accept for the schema (OpenAI: letters, digits, _ and -, up to 64)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(title or "answer"))[:64]
    return name or "answer"


def _checked_object(schema: dict[str, Any], what: str) -> dict[str, Any]:
    if (
        schema.get("type") != "object"
        or not isinstance(schema.get("properties"), dict)
        or not schema["properties"]
    ):
        raise ConfigurationError(
            f"{what} must describe an object with properties (one column each), "
            f"got type {schema.get('type')!r}"
        )
    try:
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConfigurationError(f"{what} is not a valid JSON Schema: {err.message}") from None
    return schema


def _dtype(prop: Mapping[str, Any]) -> Any:
    import pandas as pd

    if "enum" in prop:
        return pd.CategoricalDtype(categories=list(prop["enum"]))
    kind = prop.get("type")
    if isinstance(kind, list):  # ["integer", "null"]: an optional field
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    scalar = {"integer": "Int64", "number": "Float64", "boolean": "boolean", "string": "string"}
    if kind in scalar:
        return scalar[kind]
    if kind in ("array", "object"):
        return pd.ArrowDtype(_arrow_type(prop))
    return "object"  # anyOf and other shapes: the parsed values as they are


def _arrow_type(prop: Mapping[str, Any]) -> Any:
    import pyarrow as pa

    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind == "array":
        return pa.list_(_arrow_type(prop.get("items", {})))
    if kind == "object" and isinstance(prop.get("properties"), dict):
        return pa.struct([pa.field(k, _arrow_type(v)) for k, v in prop["properties"].items()])
    scalars = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
    return scalars.get(kind, pa.string()) if isinstance(kind, str) else pa.string()


def _coerced(cells: list[Any], kind: Any) -> list[Any]:
    """Cells Arrow refused as they are: whole floats for an integer column (JSON's 3.0 is an
    integer to JSON Schema), and values of an untyped field (anyOf ...) as JSON text."""
    import pyarrow as pa

    if pa.types.is_integer(kind):
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in cells]
    if pa.types.is_string(kind):
        return [v if v is None or isinstance(v, str) else json.dumps(v) for v in cells]
    return cells


def _polars_dtype(prop: Mapping[str, Any]) -> Any:
    import polars as pl

    if "enum" in prop:
        return pl.Enum([str(v) for v in prop["enum"]])
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind == "array":
        return pl.List(_polars_dtype(prop.get("items", {})))
    if kind == "object" and isinstance(prop.get("properties"), dict):
        return pl.Struct({k: _polars_dtype(v) for k, v in prop["properties"].items()})
    scalars = {"integer": pl.Int64, "number": pl.Float64, "boolean": pl.Boolean}
    return scalars.get(kind, pl.String) if isinstance(kind, str) else pl.String


def _check_labels(labels: object) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ConfigurationError(f"labels must be a non-empty list of strings, got {labels!r}")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ConfigurationError(f"labels must be non-empty strings, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"labels must differ, got {list(labels)!r}")
    return list(labels)


def labels_schema(labels: Sequence[str], multi_label: bool = False) -> dict[str, Any]:
    """The schema of ``classify``: one enum field ``label`` (or a list of them, ``labels``).

    >>> labels_schema(["yes", "no"])["properties"]
    {'label': {'type': 'string', 'enum': ['yes', 'no']}}
    """
    labels = _check_labels(labels)
    label = {"type": "string", "enum": labels}
    field = {"labels": {"type": "array", "items": label}} if multi_label else {"label": label}
    return {"type": "object", "properties": field, "required": list(field), "additionalProperties": False}


def classify_instruction(labels: Sequence[str], multi_label: bool = False) -> str:
    """The default system prompt of ``classify``."""
    choice = "every label that applies" if multi_label else "exactly one label"
    return f"Classify the user's text. Choose {choice} from: {', '.join(labels)}."
