"""MkDocs hook: the configuration reference, generated from the pydantic models.

In the page `reference/config.md` the marker line `<!-- config-reference -->` is replaced by one
section per model of MODELS (and one per pydantic model nested in their fields): its heading, the
first paragraph of its docstring, and a table field | type | default | description read from
`model_fields`. Nothing is restated by hand: a setting's documentation is its `Field(description=…)`.

A dotted path that does not import, or that names something other than a pydantic model, is a
warning, so `mkdocs build --strict` fails and the list stays honest.
"""

from __future__ import annotations

import html
import importlib
import inspect
import logging
import re
import sys
import types
import typing
from pathlib import Path

# The models the reference documents, in page order. Nested models are found on their own.
MODELS = [
    "chimein.presets.ModelPreset",
    "chimein.train.config.TrainConfig",
    "chimein.data.generation_config.GenerationSettings",
    "chimein.data.generation_config.GenerationConfig",
    "flows.generate.GenerateParams",
    "flows.retrain.RetrainParams",
    "flows.compare.CompareParams",
]

PAGE = "reference/config.md"
MARKER = "<!-- config-reference -->"

log = logging.getLogger("mkdocs.plugins.config_reference")


def on_config(config, **kwargs):
    # flows/ and tasks/ are not installed packages: import them from the repository root
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        log.warning(f"{PAGE}: no marker line {MARKER!r}; the configuration reference was not generated")
        return markdown
    return markdown.replace(MARKER, render(MODELS))


# --- rendering ------------------------------------------------------------------------------------


def render(paths: list[str]) -> str:
    from pydantic import BaseModel

    listed = []
    for path in paths:
        module_name, _, name = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), name)
        except Exception as e:  # noqa: BLE001 — any import failure is reported, not raised
            log.warning(f"config reference: cannot import {path}: {type(e).__name__}: {e}")
            continue
        if not (inspect.isclass(obj) and issubclass(obj, BaseModel)):
            log.warning(f"config reference: {path} is not a pydantic model; skipped")
            continue
        listed.append(obj)

    done: set[type] = set()
    out: list[str] = []

    def section(model: type, level: int) -> None:
        done.add(model)
        out.append(_section(model, level))
        for nested in _nested_models(model):
            if nested not in done and nested not in listed:
                section(nested, level + 1)

    for model in listed:
        if model not in done:
            section(model, 2)
    return "\n".join(out)


def _anchor(model: type) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{model.__module__}.{model.__qualname__}".lower()).strip("-")


def _section(model: type, level: int) -> str:
    lines = [f"{'#' * level} {model.__name__} {{ #{_anchor(model)} }}", "",
             f"`{model.__module__}.{model.__qualname__}`", ""]
    doc = model.__dict__.get("__doc__")
    if doc:
        first = inspect.cleandoc(doc).split("\n\n")[0]
        lines += [_text(" ".join(first.split())), ""]
    config = model.model_config
    notes = []
    if config.get("extra") == "forbid":
        notes.append("unknown keys fail")
    if config.get("frozen"):
        notes.append("frozen (read-only once built)")
    if notes:
        lines += [f"*{'; '.join(notes).capitalize()}.*", ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        type_cell = _type(field.annotation)
        constraints = _constraints(field.metadata)
        if constraints:
            type_cell += f", {constraints}"
        description = _text(field.description) if field.description else "—"
        lines.append(f"| <code>{_esc(name)}</code> | {type_cell} | {_default(field)} | {description} |")
    lines.append("")
    return "\n".join(lines)


def _nested_models(model: type) -> list[type]:
    found: list[type] = []
    for field in model.model_fields.values():
        for t in _walk(field.annotation):
            if t not in found:
                found.append(t)
    return found


def _walk(annotation) -> list[type]:
    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _walk(arg)]


# --- cells ----------------------------------------------------------------------------------------


def _esc(s: str) -> str:
    """Text for inside a table cell: HTML-escaped, pipes as entities (a pipe would split the cell)."""
    return html.escape(s, quote=False).replace("|", "&#124;")


def _code(s: str) -> str:
    return f"<code>{_esc(s)}</code>"


def _text(s: str) -> str:
    """A description: `code spans` kept as code, everything else escaped, on one line."""
    parts = " ".join(s.split()).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        return _esc(" ".join(s.split()))
    return "".join(_code(p) if i % 2 else _esc(p) for i, p in enumerate(parts))


def _type(annotation) -> str:
    from pydantic import BaseModel

    if annotation is None or annotation is type(None):
        return _code("None")
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{_code(annotation.__name__)}](#{_anchor(annotation)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return _code(" | ".join(repr(a) for a in args))
    if origin is typing.Union or origin is types.UnionType:
        return " &#124; ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join(_type(a) for a in args)
        return f"{_code(name)}[{inner}]" if args else _code(name)
    if inspect.isclass(annotation):
        return _code(annotation.__name__)
    return _code(str(annotation).replace("typing.", ""))


def _constraints(metadata: list) -> str:
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "min length",
               "max_length": "max length", "multiple_of": "multiple of", "pattern": "pattern"}
    out = []
    for item in metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                text = f"{symbol} {_code(str(value))}" if attr == "pattern" else _esc(f"{symbol} {value}")
                if text not in out:  # a field copied from another model can carry its metadata twice
                    out.append(text)
    return ", ".join(out)


def _default(field) -> str:
    from pydantic import BaseModel

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that takes the validated data
            return _code(f"{getattr(field.default_factory, '__name__', 'factory')}(data)")
    elif field.is_required():
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        changed = value.model_dump(exclude_defaults=True)
        if not changed:
            return f"[defaults](#{_anchor(type(value))})"
        return _code(f"{type(value).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})")
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):  # an Enum
        value = value.value
    return _code(repr(value))
