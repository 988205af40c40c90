"""Row readers for JSON Lines, JSON (array, object of objects, or concatenated objects) and CSV files.

Each reader yields ``(line, value, error)``: ``value`` is the parsed row (None when ``error`` says why the row is
unusable). A bad row never stops the file; a file the OS cannot read raises UsageError with one line.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from medrl.errors import UsageError

RawRow = tuple[int, Any, "str | None"]
TOO_DEEP = "JSON nested too deeply to read (arrays/objects over ~1,000 levels deep)"
_BOM = b"\xef\xbb\xbf"


class NonFiniteNumber(ValueError):
    """A JSON number that is not finite (``NaN``, ``Infinity``, or too large for a float, like ``1e999``)."""


def _no_constant(name: str):
    raise NonFiniteNumber(f"non-finite number {name} (not valid JSON)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NonFiniteNumber(f"number {text[:40]} is too large for a float")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
"""Rows never hold NaN or infinities: such a number makes its row a reject (it would become the text "nan")."""
_WS = " \t\r\n"
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # huge cells are rejected by size below, never by the csv module


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"cannot read {path}: it is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _too_big(size: int, max_row_bytes: int) -> str:
    return f"row of {size} bytes exceeds data.max_row_bytes={max_row_bytes}"


def read_jsonl(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    """One JSON value per line; blank lines are skipped."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = 0
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            if len(raw) > max_row_bytes:
                rows += 1
                yield line_no, None, _too_big(len(raw), max_row_bytes)
                continue
            raw = raw.removeprefix(_BOM).strip()
            if not raw:
                continue
            rows += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, None, f"undecodable bytes (not UTF-8) at byte {exc.start}"
                continue
            try:
                yield line_no, _DECODER.decode(text), None
            except json.JSONDecodeError as exc:
                yield line_no, None, f"malformed JSON: {exc.msg} at column {exc.colno}"
            except NonFiniteNumber as exc:
                yield line_no, None, str(exc)
            except RecursionError:
                yield line_no, None, TOO_DEEP
    if rows == 0:
        yield 0, None, "empty file (no rows)"


def _decode_text(data: bytes) -> str:
    """UTF-8 (BOM stripped); undecodable bytes become lone surrogates, which the schema rejects per field."""
    data = data.removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


class _Lines:
    """Incremental character offset -> 1-based line number."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def read_json(path: Path, max_row_bytes: int) -> Iterator[RawRow]:
    """A JSON array of rows, an object whose values are rows (the key is added as ``_key``), or rows written one
    after another (JSON Lines saved as .json). A syntax error rejects the rest of the file, keeping earlier rows."""
    text = _decode_text(read_bytes(path))
    lines = _Lines(text)
    pos = _skip_ws(text, 0)
    if pos == len(text):
        yield 0, None, "empty file (no rows)"
        return
    try:
        if text[pos] == "[":
            yield from _scan_container(text, pos, "]", False, lines, max_row_bytes)
        elif text[pos] == "{" and _is_object_of_rows(text, pos):
            yield from _scan_container(text, pos, "}", True, lines, max_row_bytes)
        else:
            yield from _scan_stream(text, pos, lines, max_row_bytes)
    except json.JSONDecodeError as exc:
        yield lines.at(exc.pos), None, f"malformed JSON: {exc.msg}; the rest of the file is skipped"


def _is_object_of_rows(text: str, pos: int) -> bool:
    """``{"k": {...}, ...}`` (rows keyed by id) rather than a single row object."""
    pos = _skip_ws(text, pos + 1)
    if pos >= len(text) or text[pos] != '"':
        return False
    _, pos = _DECODER.raw_decode(text, pos)
    pos = _skip_ws(text, pos)
    if pos >= len(text) or text[pos] != ":":
        return False
    return _skip_ws(text, pos + 1) < len(text) and text[_skip_ws(text, pos + 1)] == "{"


def _row(value: Any, line: int, size: int, max_row_bytes: int) -> RawRow:
    if size > max_row_bytes:
        return line, None, _too_big(size, max_row_bytes)
    return line, value, None


def _scan_container(text: str, pos: int, close: str, keyed: bool, lines: _Lines, max_row_bytes: int
                    ) -> Iterator[RawRow]:
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == close:
        yield lines.at(pos), None, "empty file (no rows)"
        return
    while True:
        key = None
        if keyed:
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if pos >= len(text) or text[pos] != ":":
                raise json.JSONDecodeError("expected ':'", text, pos)
            pos = _skip_ws(text, pos + 1)
        row, pos = _read_value(text, pos, lines, max_row_bytes, key, keyed)
        yield row
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == close:
            return
        if pos >= len(text) or text[pos] != ",":
            raise json.JSONDecodeError(f"expected ',' or '{close}'", text, pos)
        pos = _skip_ws(text, pos + 1)


def _read_value(text: str, pos: int, lines: _Lines, max_row_bytes: int, key: Any = None, keyed: bool = False
                ) -> tuple[RawRow, int]:
    """The row of the JSON value at ``pos`` (``keyed``: an object gets ``_key``; nested too deep for the decoder: a
    ``TOO_DEEP`` row, the value skipped by bracket counting) and the position after the value."""
    start = pos
    try:
        value, pos = _DECODER.raw_decode(text, pos)
    except RecursionError:
        return (lines.at(start), None, TOO_DEEP), _skip_value(text, start)
    except NonFiniteNumber as exc:
        return (lines.at(start), None, str(exc)), _skip_value(text, start)
    if keyed and isinstance(value, dict):
        value = {**value, "_key": key}
    return _row(value, lines.at(start), len(text[start:pos].encode("utf-8", "surrogateescape")), max_row_bytes), pos


def _skip_value(text: str, pos: int) -> int:
    """End of the JSON value at ``pos`` found by counting brackets outside strings (no recursion, any depth)."""
    depth, i, n = 0, pos, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                return i + 1
        elif depth == 0 and c == ",":
            return i
        i += 1
    raise json.JSONDecodeError("unterminated value", text, pos)


def _scan_stream(text: str, pos: int, lines: _Lines, max_row_bytes: int) -> Iterator[RawRow]:
    while pos < len(text):
        row, pos = _read_value(text, pos, lines, max_row_bytes)
        yield row
        pos = _skip_ws(text, pos)


def decode_csv(data: bytes, encoding: str) -> tuple[str, str]:
    """(text, encoding used). ``auto``: UTF-8 (BOM stripped) when the file is UTF-8 but for at most one bad byte
    per thousand, else GB18030 (a superset of GBK/GB2312). Bad bytes become lone surrogates, and the rows holding
    them are rejected by the schema."""
    if encoding != "auto":
        try:
            return data.decode(encoding, errors="surrogateescape"), encoding
        except LookupError:
            raise UsageError(f"unknown encoding '{encoding}'") from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    # A UTF-8 file with a few bad bytes must stay UTF-8 (GB18030 would "decode" it into mojibake without error);
    # a GBK file is mostly invalid as UTF-8.
    as_utf8 = data.removeprefix(_BOM).decode("utf-8", errors="surrogateescape")
    bad = sum(0xDC80 <= ord(c) <= 0xDCFF for c in as_utf8)
    if bad <= max(4, len(data) // 1000):
        return as_utf8, "utf-8"
    try:
        return data.decode("gb18030"), "gb18030"
    except UnicodeDecodeError:
        return data.decode("gb18030", errors="surrogateescape"), "gb18030"


def read_csv(path: Path, max_row_bytes: int, encoding: str = "auto") -> Iterator[RawRow]:
    """CSV with a header row; each row is a dict keyed by the header. NUL bytes are dropped (a row of nothing else is
    a reject). A header naming a column twice rejects the file. A quote that never closes (the csv module reads
    every later line into one field) rejects only its own line, with that reason, and the lines it swallowed are
    read again as rows."""
    text, used = decode_csv(read_bytes(path), encoding)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.replace("\x00", "").strip() for h in next(reader)]
    except StopIteration:
        yield 0, None, "empty file (no rows)"
        return
    except csv.Error as exc:
        yield 1, None, f"malformed CSV header: {exc}"
        return
    first: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if name and name in first:
            yield reader.line_num, None, (f"duplicate column '{name}' in the header (columns {first[name]} and {i}): "
                                          "the file is skipped")
            return
        first.setdefault(name, i)
    rows, offset, last = 0, 0, reader.line_num
    physical: list[str] | None = None
    while True:
        start = offset + last + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows, last = rows + 1, reader.line_num
            yield start, None, f"malformed CSV: {exc}"
            continue
        end = offset + reader.line_num
        last = reader.line_num
        had_nul = any("\x00" in c for c in cells)
        cells = [c.replace("\x00", "") for c in cells] if had_nul else cells
        if not any(c.strip() for c in cells):
            if had_nul:
                rows += 1
                yield start, None, "row holds only NUL bytes"
            continue
        rows += 1
        size = sum(len(c.encode("utf-8", "surrogateescape")) for c in cells)
        if len(cells) != len(header) and end > start and any("\n" in c for c in cells):
            # an unclosed quote: reject this line, read the swallowed lines again
            yield start, None, (f"unclosed quote: a quoted field opened on line {start} runs to line {end} "
                                f"({len(cells)} columns, the header has {len(header)}); lines {start + 1}-{end} are "
                                f"read again as rows")
            # the csv module's physical lines (\n, \r, \r\n; str.splitlines would also split at \x0c, \u2028, ...)
            physical = physical if physical is not None else io.StringIO(text, newline="").readlines()
            reader = csv.reader(io.StringIO("".join(physical[start:]), newline=""))
            offset, last = start, 0
        elif size > max_row_bytes:
            yield start, None, _too_big(size, max_row_bytes)
        elif len(cells) != len(header):
            yield start, None, f"row has {len(cells)} columns, the header has {len(header)}"
        else:
            yield start, dict(zip(header, cells)), None
    if rows == 0:
        yield 0, None, f"empty file (header only, {used})"
