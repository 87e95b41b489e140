"""A self-contained HTML page from report Markdown and PNGs (images inlined as data URIs)."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Mapping
from pathlib import Path

_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_LIST_ITEM = re.compile(r"^[-*]\s+")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem}"
    "td.num,th.num{text-align:right}code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}"
)


def _data_uri(image: str | os.PathLike | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _inline(text: str, images: Mapping[str, str | os.PathLike | bytes], used: set[str]) -> str:
    """Escape, then render code spans, images, links and bold (code spans are left alone)."""
    pieces = text.split("`")
    out = []
    for index, piece in enumerate(pieces):
        if index % 2 == 1 and index < len(pieces) - 1:
            out.append(f"<code>{html.escape(piece)}</code>")
            continue
        if index % 2 == 1:  # an unmatched backtick
            piece = "`" + piece

        def image(match: re.Match) -> str:
            alt, target = match.group(1), match.group(2)
            if target in images:
                used.add(target)
                return f'<img alt="{html.escape(alt)}" src="{_data_uri(images[target])}">'
            return f'<img alt="{html.escape(alt)}" src="{html.escape(target)}">'

        escaped = html.escape(piece, quote=False)
        escaped = _IMAGE_LINK.sub(image, escaped)
        escaped = _LINK.sub(lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', escaped)
        out.append(_BOLD.sub(r"<strong>\1</strong>", escaped))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def _table_row(tag: str, cells: list[str], numeric: list[bool], images, used: set[str]) -> str:
    def open_tag(column: int) -> str:
        return f'<{tag} class="num">' if column < len(numeric) and numeric[column] else f"<{tag}>"

    return "<tr>" + "".join(f"{open_tag(i)}{_inline(cell, images, used)}</{tag}>" for i, cell in enumerate(cells)) + "</tr>"


def render_html(
    markdown_text: str, images: Mapping[str, str | os.PathLike | bytes] | None = None, *, title: str = "egp-export report"
) -> str:
    """A self-contained HTML page from report Markdown (headings, paragraphs, lists, tables, code, bold, links).

    ``images`` maps a name to a PNG (path or bytes): ``![alt](name)`` in the
    Markdown is embedded in place; images the Markdown does not reference are
    appended at the end, under their names.
    """
    images = dict(images or {})
    used: set[str] = set()
    lines = markdown_text.splitlines()
    body: list[str] = []
    paragraph: list[str] = []
    index = 0

    def flush() -> None:
        if paragraph:
            body.append("<p>" + " ".join(_inline(line, images, used) for line in paragraph) + "</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2), images, used)}</h{level}>")
        elif stripped.startswith("|") and index + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[index + 1].strip()):
            flush()
            header = _cells(stripped)
            numeric = [cell.strip().endswith(":") for cell in _cells(lines[index + 1])]
            rows = []
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1

            table = ["<table>", _table_row("th", header, numeric, images, used)]
            table += [_table_row("td", row, numeric, images, used) for row in rows]
            table.append("</table>")
            body.append("\n".join(table))
            continue
        elif _LIST_ITEM.match(stripped):
            flush()
            items = []
            while index < len(lines) and _LIST_ITEM.match(lines[index].strip()):
                item = _LIST_ITEM.sub("", lines[index].strip())
                items.append(f"<li>{_inline(item, images, used)}</li>")
                index += 1
            body.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    for name, image in images.items():
        if name not in used:
            caption = html.escape(name)
            body.append(f'<figure><img alt="{caption}" src="{_data_uri(image)}"><figcaption>{caption}</figcaption></figure>')
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
