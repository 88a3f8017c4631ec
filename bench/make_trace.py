"""Make an editing trace for ``granite-lsp bench`` from a real source file.

The trace opens the file with one function's body removed, then types that body back the way a person
in an editor does: a character at a time with a completion request after each keystroke, Enter with
the editor's auto-indent, brackets and quotes auto-closed (and typed over), a typo now and then that is
fixed with backspace, and one trip of the cursor elsewhere in the file and back.

    python bench/make_trace.py granite_lsp/fim.py _line_end -o bench/traces/type_function.jsonl

``--moment`` makes the traces of the moments other than typing forward (issue 15), with the user's
pauses as ``wait`` operations and the cursor moves an editor reports as ``focus``; the requests of each
moment carry its ``kind`` (bench reports per kind):
  open     open the file (focus at the cursor), wait 2 s, request ("first"), then type
  jump     type; jump 5-30 lines away ("jump") and straight back ("back"), 1 s pauses; repeat
  paste    type; paste 20 lines of the file ~40 lines above the cursor, wait 1 s, back ("after_paste"), type
  imports  type; add an import at the top, wait 1 s, back ("after_import"), type
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from granite_lsp.documents import Document  # noqa: E402

PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "'": "'"}


class Typist:
    def __init__(self, uri: str, text: str, cursor: int) -> None:
        self.uri = uri
        self.doc = Document(uri, text)
        self.cursor = cursor
        self.ops: list[dict] = [{"op": "open", "uri": uri, "languageId": "python", "text": text}]

    def _pos(self, offset: int) -> dict:
        line, char = self.doc.position_at(offset)
        return {"line": line, "character": char}

    def replace(self, start: int, end: int, text: str, cursor_after: int) -> None:
        self.ops.append(
            {"op": "change", "uri": self.uri, "range": {"start": self._pos(start), "end": self._pos(end)}, "text": text}
        )
        self.doc.text = self.doc.text[:start] + text + self.doc.text[end:]
        self.doc._line_starts = None
        self.cursor = cursor_after

    def complete(self, offset: int | None = None, kind: str = "") -> None:
        p = self._pos(self.cursor if offset is None else offset)
        self.ops.append({"op": "complete", "uri": self.uri, **p, **({"kind": kind} if kind else {})})

    def wait(self, ms: int) -> None:
        self.ops.append({"op": "wait", "ms": ms})

    def focus(self, offset: int) -> None:
        self.ops.append({"op": "focus", "uri": self.uri, **self._pos(offset)})

    def line_offset(self, offset: int, lines: int) -> int:
        """The start of the line ``lines`` away from the one holding ``offset`` (clamped to the file)."""
        line, _ = self.doc.position_at(offset)
        return self.doc.offset_at(max(0, min(line + lines, self.doc.text.count("\n"))), 0)

    def type_text(self, body: str, typo_every: int = 37) -> None:
        i = 0
        typed = 0
        while i < len(body):
            ch = body[i]
            text = self.doc.text
            if ch == "\n":
                # Enter: the editor inserts the newline plus the next line's indentation.
                indent = re.match(r"[ \t]*", body[i + 1 :]).group(0)
                self.replace(self.cursor, self.cursor, "\n" + indent, self.cursor + 1 + len(indent))
                i += 1 + len(indent)
            elif ch in PAIRS.values() and text[self.cursor : self.cursor + 1] == ch:
                self.cursor += 1  # typing over the auto-inserted closer: no edit, the cursor moves
                i += 1
            elif ch in PAIRS:
                self.replace(self.cursor, self.cursor, ch + PAIRS[ch], self.cursor + 1)
                i += 1
            else:
                if typo_every and typed and typed % typo_every == 0 and ch.isalpha():
                    self.replace(self.cursor, self.cursor, "q", self.cursor + 1)
                    self.complete()
                    self.replace(self.cursor - 1, self.cursor, "", self.cursor - 1)
                    self.complete()
                self.replace(self.cursor, self.cursor, ch, self.cursor + 1)
                i += 1
            typed += 1
            self.complete()


def _open(t: Typist, body: str) -> None:
    t.focus(t.cursor)  # the editor shows the file with the cursor where it opened it
    t.wait(2000)
    t.complete(kind="first")
    t.type_text(body[:40])


def _jump(t: Typist, body: str) -> None:
    t.complete(kind="first")
    typed = 0
    for lines in (-5, 12, -30, 20, -8, 25):
        t.type_text(body[typed : typed + 6])
        typed += 6
        here = t.cursor
        there = t.line_offset(here, lines)
        t.focus(there)
        t.wait(1000)
        t.complete(there, kind="jump")
        t.focus(here)
        t.wait(1000)
        t.complete(kind="back")
    t.type_text(body[typed : typed + 6])


def _edit_above(t: Typist, body: str, kind: str) -> None:
    t.complete(kind="first")
    t.type_text(body[:10])
    text = t.doc.text
    if kind == "after_paste":
        at = t.line_offset(t.cursor, -40)
        src = t.line_offset(0, 5)
        pasted = text[src : t.line_offset(src, 20)]
    else:
        m = re.search(r"^(import|from) .*\n", text, re.M)
        at = m.end() if m else 0
        pasted = "import functools\n"
    t.focus(at)
    here = t.cursor + len(pasted)
    t.replace(at, at, pasted, here)
    t.wait(1000)
    t.focus(here)
    t.complete(kind=kind)
    t.type_text(body[10:30])


MOMENTS = {
    "open": _open,
    "jump": _jump,
    "paste": lambda t, body: _edit_above(t, body, "after_paste"),
    "imports": lambda t, body: _edit_above(t, body, "after_import"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("function", help="name of the function whose body is typed")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--uri", default=None)
    p.add_argument("--moment", choices=("type", *MOMENTS), default="type")
    args = p.parse_args()
    source = args.file.read_text()
    m = re.search(rf"^([ \t]*)def {re.escape(args.function)}\(.*?:\n", source, re.M | re.S)
    if not m:
        raise SystemExit(f"no function {args.function} in {args.file}")
    body_start = m.end()
    indent = m.group(1)
    end = body_start
    for line in source[body_start:].splitlines(keepends=True):
        if line.strip() and not line.startswith(indent + " ") and not line.startswith(indent + "\t"):
            break
        end += len(line)
    body = source[body_start:end].rstrip("\n")
    body_indent = re.match(r"[ \t]*", body).group(0)
    text = source[:body_start] + body_indent + source[body_start + len(body) :]
    typist = Typist(args.uri or f"file:///bench/{args.file.name}", text, body_start + len(body_indent))
    if args.moment == "type":
        typist.complete()
        half = len(body) // 2
        typist.type_text(body[len(body_indent) : half])
        # Move elsewhere (near the top of the file) and come back.
        here = typist.cursor
        typist.complete(len(source) // 5)
        typist.complete(here)
        typist.type_text(body[half:])
    else:
        MOMENTS[args.moment](typist, body[len(body_indent) :])
        source = typist.doc.text
    if typist.doc.text != source:
        raise SystemExit("internal error: the replayed trace does not reproduce the file")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(op, ensure_ascii=False) + "\n" for op in typist.ops))
    n = sum(op["op"] == "complete" for op in typist.ops)
    print(f"{args.out}: {len(typist.ops)} operations, {n} completions, {len(body)} characters typed")


if __name__ == "__main__":
    main()
