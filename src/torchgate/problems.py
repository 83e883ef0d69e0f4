"""`problems`: what went wrong, as plain sentences: a pydantic `ValidationError` one
sentence per problem (`describe`), any other exception by its first line (`first_line`).

Every place that validates what a person wrote (model.toml, the keys file, settings, CLI
flags, admin request bodies) reports through here, so that no pydantic wording ("Value
error, ", "(and 3 more)", union tags, "Input should be ...") reaches anyone, and several
problems are listed, not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic

_PREFIXES = ("Value error, ", "Assertion failed, ")
_DISCRIMINATED = {"image", "text"}  # the tags of [preprocess]'s kinds, never a key
_BOUNDS = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be over {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be under {lt}",
}
_TYPES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
}


def where(loc: tuple[Any, ...], name: Callable[[str], str] = str) -> str:
    """A location as a dotted key path (list indexes as [i]); "" for the whole object."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif i and str(loc[i - 1]) == "preprocess" and part in _DISCRIMINATED:
            continue  # pydantic's branch of a discriminated union, not a key of the file
        else:
            parts.append(name(str(part)))
    return ".".join(parts)


def message(error: dict[str, Any]) -> str:
    """One error's message, without pydantic's artefacts."""
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required, and missing"
    context = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        field = str(context.get("discriminator", "kind")).strip("'")
        expected = str(context.get("expected_tags", "")).replace("'", "")
        return f"{field} must be one of {expected}, not {context.get('tag')!r}"
    if kind in _BOUNDS:
        return _BOUNDS[kind].format(**{k: _number(v) for k, v in context.items()})
    if kind in ("too_short", "too_long"):
        count = context.get("min_length" if kind == "too_short" else "max_length")
        bound = "at least" if kind == "too_short" else "at most"
        items = "item" if count == 1 else "items"
        return f"needs {bound} {count} {items}, not {context.get('actual_length')}"
    if kind in ("literal_error", "enum"):
        return f"must be {context.get('expected', 'one of the allowed values')}"
    if kind in ("string_too_short", "string_too_long"):
        count = context.get("min_length" if kind == "string_too_short" else "max_length")
        bound = "at least" if kind == "string_too_short" else "at most"
        return f"needs {bound} {count} character{'' if count == 1 else 's'}"
    if kind == "string_pattern_mismatch":
        return "is not in the form this key takes"
    if kind in _TYPES:
        return _TYPES[kind]
    text = str(error.get("msg", "invalid"))
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    loc = error.get("loc") or ()
    if loc and isinstance(loc[-1], str) and text.startswith(f"{loc[-1]} must "):
        text = text[len(loc[-1]) + 1 :]  # "datatype: datatype must be ..." says it twice
    given = error.get("input")
    if (
        kind == "value_error"
        and text.startswith("must ")
        and isinstance(given, str | int | float)
        and repr(given) not in text
    ):
        shown = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
        text = f"{text}, not {shown}"
    return text


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def describe(exc: pydantic.ValidationError | Any, name: Callable[[str], str] = str) -> str:
    """Every problem as `key: message`, joined by "; " (the key left out for the whole)."""
    errors = exc.errors()
    deeper = [tuple(e.get("loc", ())) for e in errors]
    lines = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in deeper
        ):
            continue  # an item of it failed, which is said already
        key = where(loc, name)
        lines.append(f"{key}: {message(error)}" if key else message(error))
    return "; ".join(dict.fromkeys(lines))


def first_line(exc: BaseException, limit: int = 200, empty: str | None = None) -> str:
    """An exception's message cut to its first line, at most `limit` characters: libraries
    (tokenizers, Pillow, torch) put tracebacks and hints after it. `empty` (else the
    exception's type name) when it has no message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]
