"""Render a report, built as a list of blocks, to one self-contained HTML page and to Markdown.

Blocks are plain dataclasses, so the report content is assembled once (``medrl.report.build``) and written twice.
HTML embeds every image as a base64 ``data:`` URI and carries its own CSS: the page opens with no network and no files
beside it. Every table cell has ``data-key="<table>|<row>|<column>"`` so tools (and tests) can read values back.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    note: bool = False
    """A warning-style note (missing stage, failed judge calls...)."""


@dataclass
class Banner:
    """A boxed warning at the head of the report (the research-use notice, how far the figures can be trusted)."""

    id: str
    title: str
    lines: list[str]


@dataclass
class Table:
    id: str
    columns: list[tuple[str, str]]
    """(key, header) pairs; the first column holds the row label."""
    rows: list[tuple[str, dict[str, str]]]
    """(row key, {column key: formatted cell text})."""
    caption: str = ""


@dataclass
class Image:
    path: Path
    title: str


@dataclass
class Pre:
    text: str
    summary: str = ""
    """When set, the text is folded under this summary line (HTML ``<details>``)."""


@dataclass
class SideBySide:
    """One prompt with the answers of several models next to each other."""

    title: str
    question: str
    reference: str | None
    answers: dict[str, str] = field(default_factory=dict)


Block = Heading | Para | Banner | Table | Image | Pre | SideBySide

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans CJK SC",sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #0b6e4f}h2{margin-top:2.2rem;color:#0b6e4f}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.92rem}
th,td{border:1px solid #ccd;padding:.3rem .6rem;text-align:left}th{background:#eef3f1}td.num{text-align:right}
caption{text-align:left;font-weight:600;padding:.3rem 0;white-space:nowrap}
.note{background:#fff6e0;border-left:4px solid #e0a800;padding:.4rem .8rem}
.banner{background:#fdecea;border:2px solid #b3261e;padding:.5rem 1rem;margin:1rem 0}.banner b{color:#b3261e}
.banner ul{margin:.3rem 0}
figure{display:inline-block;margin:.5rem}figure img{max-width:560px;border:1px solid #ddd}
pre{white-space:pre-wrap;background:#f6f8fa;padding:.6rem;font-size:.85rem}
.sbs{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:.6rem}
.sbs div{border:1px solid #ddd;padding:.5rem;font-size:.88rem;white-space:pre-wrap;overflow-wrap:anywhere}
.sbs b{display:block;color:#0b6e4f}
"""


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


_NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?%?|–")


def _num_class(text: str) -> str:
    return ' class="num"' if _NUMBER.fullmatch(str(text)) else ""


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f'<p class="note">{_e(b.text)}</p>' if b.note else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Banner):
        items = "".join(f"<li>{_e(line)}</li>" for line in b.lines)
        return f'<div class="banner" id="{_e(b.id)}" role="note"><b>{_e(b.title)}</b><ul>{items}</ul></div>'
    if isinstance(b, Table):
        head = "".join(f"<th>{_e(h)}</th>" for _, h in b.columns)
        body = []
        for row_key, cells in b.rows:
            tds = "".join(f'<td data-key="{_e(f"{b.id}|{row_key}|{k}")}"{_num_class(cells.get(k, ""))}>'
                          f'{_e(cells.get(k, ""))}</td>' for k, _ in b.columns)
            body.append(f"<tr>{tds}</tr>")
        caption = f"<caption>{_e(b.caption)}</caption>" if b.caption else ""
        return f'<table id="{_e(b.id)}">{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    if isinstance(b, Image):
        return (f'<figure><img src="{_data_uri(b.path)}" alt="{_e(b.title)}" '
                f'data-plot="{_e(Path(b.path).stem)}"></figure>')
    if isinstance(b, Pre):
        pre = f"<pre>{_e(b.text)}</pre>"
        return f"<details><summary>{_e(b.summary)}</summary>{pre}</details>" if b.summary else pre
    if isinstance(b, SideBySide):
        ref = f"<p><b>Reference:</b> {_e(b.reference)}</p>" if b.reference else ""
        cols = "".join(f"<div><b>{_e(m)}</b>{_e(a)}</div>" for m, a in b.answers.items())
        return (f"<h4>{_e(b.title)}</h4><p><b>Question:</b> {_e(b.question)}</p>{ref}"
                f'<div class="sbs">{cols}</div>')
    raise TypeError(f"unknown block {type(b).__name__}")


def to_html(title: str, blocks: list[Block]) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block, md_dir: Path) -> str:
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Para):
        return f"> **Note:** {b.text}" if b.note else b.text
    if isinstance(b, Banner):
        return "\n".join([f"> **{b.title}**", ">"] + [f"> - {line}" for line in b.lines])
    if isinstance(b, Table):
        lines = [f"**{b.caption}**", ""] if b.caption else []
        lines.append("| " + " | ".join(_md_cell(h) for _, h in b.columns) + " |")
        lines.append("|" + "|".join("---" for _ in b.columns) + "|")
        lines += ["| " + " | ".join(_md_cell(cells.get(k, "")) for k, _ in b.columns) + " |" for _, cells in b.rows]
        return "\n".join(lines)
    if isinstance(b, Image):
        return f"![{b.title}]({Path(b.path).resolve().relative_to(md_dir.resolve()).as_posix()})"
    if isinstance(b, Pre):
        fence = f"```\n{b.text}\n```"
        return f"<details><summary>{b.summary}</summary>\n\n{fence}\n\n</details>" if b.summary else fence
    if isinstance(b, SideBySide):
        parts = [f"#### {b.title}", "", f"**Question:** {b.question}", ""]
        if b.reference:
            parts += [f"**Reference:** {b.reference}", ""]
        for m, a in b.answers.items():
            parts += [f"**{m}:**", "", "> " + a.replace("\n", "\n> "), ""]
        return "\n".join(parts)
    raise TypeError(f"unknown block {type(b).__name__}")


def to_markdown(title: str, blocks: list[Block], md_dir: Path) -> str:
    """Markdown; images are linked relative to ``md_dir`` (the folder the .md file is written to)."""
    return f"# {title}\n\n" + "\n\n".join(_md_block(b, md_dir) for b in blocks) + "\n"
