"""A TOML writer for the documents proxy.testing builds (tomllib only reads).

It covers what a tlsproxy config holds: tables, arrays of tables ([[site]]), inline tables
inside them (client_auth), strings, numbers, booleans and arrays of those. None means "leave
the key out", since TOML has no null.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string when non-ASCII is left as is (TOML has no
    # surrogate escapes) and control characters are escaped, which json does.
    return json.dumps(text, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML here takes finite numbers only, not {value!r}")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    if hasattr(value, "__fspath__"):
        return _string(str(value))
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def dumps(document: Mapping[str, Any]) -> str:
    """The TOML text of `document`."""
    lines: list[str] = []
    _table(document, (), lines)
    return "\n".join(lines).strip() + "\n"


def _table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    # Plain keys first: after a [header] every key belongs to that header's table.
    for name, value in table.items():
        if value is None or isinstance(value, Mapping) or _is_table_array(value):
            continue
        lines.append(f"{_key(name)} = {_value(value)}")
    for name, value in table.items():
        if isinstance(value, Mapping):
            header = ".".join(_key(p) for p in (*path, name))
            lines.extend(("", f"[{header}]"))
            _table(value, (*path, name), lines)
        elif _is_table_array(value):
            header = ".".join(_key(p) for p in (*path, name))
            for item in value:
                lines.extend(("", f"[[{header}]]"))
                # Tables inside an array item are written inline: a [sub] header there would
                # need the item's full path and is easy to get wrong for a reader.
                for key, inner in item.items():
                    if inner is not None:
                        lines.append(f"{_key(key)} = {_value(inner)}")
