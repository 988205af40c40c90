"""Field help read from the config models: ``medrl config show`` (the resolved config as YAML, each field with its
doc and default as comments) and ``medrl config explain KEY``, and the key lists in ``--help``.

Each doc is the attribute docstring written under the field in ``medrl/*/config.py`` (pydantic reads them with
``use_attribute_docstrings``); every field has one (tests walk them all).
"""
from __future__ import annotations

import functools
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from medrl.config import Config, _type_name
from medrl.errors import UsageError

WIDTH = 118
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}


def doc_text(field: FieldInfo) -> str:
    """The field's docstring as plain text (reST ``code`` marks become single backticks, lines joined)."""
    text = re.sub(r"``([^`]+)``", r"`\1`", field.description or "")
    return " ".join(text.split())


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)(?<!\bvs)\.(\s|$)")


def first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of a doc, cut at ``limit`` characters."""
    match = _SENTENCE_END.search(text)
    sentence = text[:match.start() + 1] if match else text
    return sentence if len(sentence) <= limit else sentence[:limit - 1].rstrip() + "…"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly (``M`` or ``M | None``)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for a in (annotation, *(typing.get_args(annotation) if union else ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _entry_model_of(annotation: Any) -> type[BaseModel] | None:
    """The model of each value of a ``dict[str, M]`` field (``data.catalog``, ``reward.judge.prices``)."""
    if typing.get_origin(annotation) is dict:
        return _model_of(typing.get_args(annotation)[1])
    return None


def _default(field: FieldInfo) -> Any:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else to_jsonable_python(value)


@functools.cache
def _default_tree() -> dict:
    """The defaults of the whole tree (read-only: never modify the returned dict)."""
    return Config().to_dict(redact=True)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def _constraints(field: FieldInfo) -> list[str]:
    return [f"{_BOUNDS[name]} {getattr(m, name)}" for m in field.metadata for name in _BOUNDS if hasattr(m, name)]


# --------------------------------------------------------------------------- show
def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=indent + "# ", subsequent_indent=indent + "# ",
                         break_on_hyphens=False)


def _lines(model: type[BaseModel], values: dict, defaults: dict | None, depth: int) -> list[str]:
    indent, out = "  " * depth, []
    for name, field in model.model_fields.items():
        value = values.get(name)
        default = defaults.get(name) if defaults is not None else _default(field)
        out += _comment(doc_text(field), indent)
        sub, entry = _model_of(field.annotation), _entry_model_of(field.annotation)
        if sub is not None and isinstance(value, dict):
            out.append(f"{indent}{name}:")
            out += _lines(sub, value, default if isinstance(default, dict) else None, depth + 1)
        elif entry is not None and value:
            out.append(f"{indent}{name}:")
            for key, item in value.items():
                known = default.get(key) if isinstance(default, dict) else None
                out.append(f"{indent}  {_flow(key)}:" + ("" if known is not None else "  # not in the defaults"))
                out += _lines(entry, item, known, depth + 2)
        else:
            mark = "default" if value == default else f"default: {_flow(default)}"
            out.append(f"{indent}{name}: {_flow(value)}  # {mark}")
    return out


def show(cfg: Config) -> str:
    """The resolved config (secrets redacted) as YAML that loads back to it, each field preceded by its doc and
    followed by ``# default`` or ``# default: VALUE``."""
    head = ["# medrl config: every field with its doc; `medrl config explain KEY` for one key"]
    return "\n".join(head + _lines(Config, cfg.to_dict(redact=True), _default_tree(), 0)) + "\n"


# --------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class FieldHelp:
    key: str
    doc: str
    type: str
    default: Any
    constraints: list[str]
    children: list[tuple[str, str]]
    """(name, first sentence of its doc) of a section's fields; empty for a leaf."""
    mapping: bool
    """The key holds named sections (``data.catalog``): ``children`` are the keys of each entry."""


def lookup(key: str) -> FieldHelp:
    """Help of a dotted key; a ``dict`` of sections takes any entry name (``data.catalog.medqa.path``)."""
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"config key '{key}' is not a dotted key such as ppo.kl.target")
    model: type[BaseModel] = Config
    defaults: Any = _default_tree()
    field = Config.model_fields[parts[0]] if parts[0] in Config.model_fields else None
    i = 0
    while i < len(parts):
        name = parts[i]
        if name not in model.model_fields:
            where = ".".join(parts[:i]) or "top level"
            raise UsageError(f"unknown config key '{key}' (known keys in {where}: {', '.join(model.model_fields)})")
        field = model.model_fields[name]
        defaults = defaults.get(name) if isinstance(defaults, dict) else _default(field)
        sub, entry = _model_of(field.annotation), _entry_model_of(field.annotation)
        if i + 1 < len(parts) and entry is not None:  # parts[i + 1] names an entry of the mapping
            known = defaults.get(parts[i + 1]) if isinstance(defaults, dict) else None
            model, defaults, i = entry, known, i + 2
            continue
        if i + 1 < len(parts):
            if sub is None:
                raise UsageError(f"unknown config key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            model = sub
        i += 1
    entry = _entry_model_of(field.annotation)
    section = _model_of(field.annotation) or entry
    children = [(n, first_sentence(doc_text(f))) for n, f in section.model_fields.items()] if section else []
    default = defaults if defaults is not None else _default(field)
    return FieldHelp(".".join(parts), doc_text(field), _type_name(field.annotation), default, _constraints(field),
                     children, entry is not None)


def explain(key: str) -> str:
    h = lookup(key)
    lines = [f"{h.key}: {h.type}" + (f" ({', '.join(h.constraints)})" if h.constraints else "")]
    lines += textwrap.wrap(h.doc, WIDTH, initial_indent="  ", subsequent_indent="  ")
    if h.children:
        lines.append(f"  keys of {h.key}{'.<name>' if h.mapping else ''}:")
        width = max(len(n) for n, _ in h.children)
        lines += [f"    {n:<{width}}  {doc}" for n, doc in h.children]
    if not h.children or h.mapping:
        lines.append(f"  default: {_flow(h.default)}")
    return "\n".join(lines) + "\n"


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree; a ``dict`` of sections appears as ``<name>`` (e.g.
    ``data.catalog.<name>.path``)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub, entry = _model_of(field.annotation), _entry_model_of(field.annotation)
        if sub is not None:
            keys += all_keys(sub, key + ".")
        elif entry is not None:
            keys += all_keys(entry, key + ".<name>.")
    return keys


def section_epilog(sections: tuple[str, ...] = ()) -> str:
    """``--help`` text: the keys of ``sections`` (none: the top-level sections) with the first sentence of their
    docs."""
    rows = [(name, first_sentence(doc_text(f))) for name, f in Config.model_fields.items()] if not sections else []
    for section in sections:
        rows += [(f"{section}.{name}", doc) for name, doc in lookup(section).children]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["config keys (KEY=VALUE overrides; `medrl config explain KEY` for the full text, `medrl config "
                      "show [-c FILE]` for every key with its value and default):"]
                     + [f"  {k:<{width}}  {doc}" for k, doc in rows])
