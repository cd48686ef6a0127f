"""The report's building blocks (tables, figures, text) and their HTML and Markdown forms.

HTML is self-contained: figures become data: URIs, every text is escaped, no scripts and
no external resources. Markdown links figures by their path relative to the work directory.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    caption: str
    path: str  # relative to the work directory
    data: bytes
    small: bool = False  # one of many (sample grids): shown as a gallery


@dataclass
class Text:
    text: str
    pre: bool = False  # preformatted (the config)


@dataclass
class Missing:
    command: str


@dataclass
class Stale:
    command: str
    reason: str
    then: bool = False  # the command remakes a stage this one was made from: the rest follow it

    def hint(self) -> str:
        return ", then the stages after it" if self.then else ""


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
img{max-width:100%;border:1px solid #ddd}figure.small{width:240px}figcaption{font-size:.9em;color:#555}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}.missing{color:#a60}.note{color:#666;font-size:.9em}
td,code{overflow-wrap:anywhere}table{display:block;overflow-x:auto;max-width:100%}
@media print{body{max-width:none}pre{white-space:pre-wrap}table{display:table;font-size:.8em}
figure,tr{break-inside:avoid}}"""


def mime(data: bytes) -> str:
    return "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"


def html_block(b) -> str:
    e = html.escape
    if isinstance(b, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
        head = f"<thead><tr>{head}</tr></thead>" if any(b.headers) else ""  # key/value tables
        # key/value tables: each row's key is its header, for a screen reader's sake
        first = "<td>{}</td>" if any(b.headers) else '<th scope="row">{}</th>'
        rows = "".join("<tr>" + "".join((first if i == 0 else "<td>{}</td>").format(e(c)) for i, c in enumerate(r))
                       + "</tr>" for r in b.rows)
        note = f'<p class="note">{e(b.note)}</p>' if b.note else ""
        return f"<table>{head}<tbody>{rows}</tbody></table>{note}"
    if isinstance(b, Figure):
        src = f"data:{mime(b.data)};base64,{base64.b64encode(b.data).decode()}"
        cls = ' class="small"' if b.small else ""
        # alt left empty: the caption says what it shows, and a screen reader read it twice
        return (f'<figure{cls}><img src="{src}" alt="" data-path="{e(b.path)}">'
                f"<figcaption>{e(b.caption)} ({e(b.path)})</figcaption></figure>")
    if isinstance(b, Missing):
        return f'<p class="missing">Not produced yet: run <code>{e(b.command)}</code></p>'
    if isinstance(b, Stale):
        return (f'<p class="missing">Out of date: {e(b.reason)}. What follows may not describe the '
                f'current model; run <code>{e(b.command)}</code>{b.hint()}.</p>')
    return f"<pre>{e(b.text)}</pre>" if b.pre else f"<p>{e(b.text)}</p>"


def render_html(workdir: str, sections: list, generated: str) -> str:
    e = html.escape
    toc = "".join(f'<li><a href="#{a}">{e(t)}</a></li>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{e(t)}</h2>{"".join(html_block(b) for b in blocks)}</section>'
                   for a, t, blocks in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>deepfake-ray report: {e(workdir)}</title><style>{STYLE}</style></head><body>"
            f"<h1>deepfake-ray run report</h1><p>Work directory <code>{e(workdir)}</code>, "
            f"generated {e(generated)}.</p><nav><ul>{toc}</ul></nav>{body}</body></html>\n")


def md_cell(text: str) -> str:
    """A Markdown table cell of any text (a file name, a typed setting): markup shown as
    text, not rendered (a folder named `[x](y)` made a live link in a pasted issue); no
    line break or pipe that would end the cell or the row. An underscore inside a word
    stays as it is: it starts no emphasis there."""
    text = html.escape(text).replace("\\", "&#92;").replace("|", "&#124;")
    text = re.sub(r"[`*\[\]~!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: "\\" + m.group(0), text)
    return re.sub(r"[\r\n]+", " ", text)


def fence(text: str, least: int) -> str:
    """Backticks, at least `least`, more than `text` holds in a row: a code span or block
    they open is not ended inside `text` (a work directory named with one, a YAML value)."""
    return "`" * max([least, *(len(run) + 1 for run in re.findall(r"`+", text))])


def md_code(text: str) -> str:
    """`text` as a Markdown code span."""
    text = re.sub(r"[\r\n]+", " ", text)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence(text, 1)}{pad}{text}{pad}{fence(text, 1)}"


def md_block(b) -> str:
    if isinstance(b, Table):
        lines = ["| " + " | ".join(md_cell(h) for h in b.headers) + " |",
                 "|" + "---|" * len(b.headers)]
        lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in b.rows]
        return "\n".join(lines) + (f"\n\n*{md_cell(b.note)}*" if b.note else "")
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.path})"
    if isinstance(b, Missing):
        return f"*Not produced yet: run {md_code(b.command)}*"
    if isinstance(b, Stale):
        return (f"*Out of date: {md_cell(b.reason)}. What follows may not describe the current model; "
                f"run {md_code(b.command)}{b.hint()}.*")
    if b.pre:
        return f"{fence(b.text, 3)}yaml\n{b.text.rstrip()}\n{fence(b.text, 3)}"
    return b.text


def render_md(workdir: str, sections: list, generated: str) -> str:
    parts = [f"# deepfake-ray run report\n\nWork directory {md_code(workdir)}, generated {generated}. "
             "The same report with the figures embedded: report.html."]
    for _, title, blocks in sections:
        parts.append(f"## {title}\n\n" + "\n\n".join(md_block(b) for b in blocks))
    return "\n\n".join(parts) + "\n"
