"""The documents the editor has open, as it has them (unsaved edits included), and LSP positions
mapped into them.

LSP counts lines by ``\\n``, ``\\r\\n`` and ``\\r`` only (not by form feeds or Unicode line
separators, as ``str.splitlines`` would) and columns in the negotiated encoding's code units:
UTF-16 unless the client offered ``utf-8`` or ``utf-32``. A position past the end of its line
means the end of the line and a line past the end of the text means the end of the text (as the
specification says); a column inside a character (half a surrogate pair, part of a UTF-8
sequence) falls back to that character's start. Pure text: no pygls here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from santacli.errors import UsageError

ENCODINGS = ("utf-16", "utf-8", "utf-32")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_WORD_END = re.compile(r"\w*\Z")


@dataclass(frozen=True)
class Change:
    """One ``contentChanges`` entry: ``start``/``end`` as (line, character), or both None for
    the whole document."""

    text: str
    start: tuple[int, int] | None = None
    end: tuple[int, int] | None = None


@dataclass(frozen=True)
class Cursor:
    """A document split at a position: what a completion request needs from it."""

    prefix: str  # the text before the cursor
    suffix: str  # the text after it
    line: int  # the position, clamped into the text, in the client's units
    character: int
    line_prefix: str  # the cursor's line up to the cursor
    word: str  # the identifier characters just before the cursor (what clients filter by)
    word_start: int  # where they start on the line, in the client's units


@dataclass
class Document:
    uri: str
    text: str
    version: int
    language_id: str = ""


def _units(text: str, encoding: str) -> int:
    """How many code units ``text`` takes in ``encoding``."""
    if encoding == "utf-32" or text.isascii():
        return len(text)
    if encoding == "utf-16":
        return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
    return len(text.encode("utf-8", "surrogatepass"))


def _column(line: str, character: int, encoding: str) -> int:
    """The index into ``line`` (no line break) of a column in ``encoding``'s code units."""
    if character <= 0:
        return 0
    if encoding == "utf-32" or line.isascii():
        return min(character, len(line))
    units = 0
    for index, ch in enumerate(line):
        units += _units(ch, encoding)
        if units > character:  # the column falls inside this character: keep its start
            return index
        if units == character:
            return index + 1
    return len(line)


class DocumentStore:
    """Open documents by URI, changed incrementally (or whole) as ``didChange`` says."""

    def __init__(self, encoding: str = "utf-16") -> None:
        self._docs: dict[str, Document] = {}
        self.encoding = encoding

    @property
    def encoding(self) -> str:
        return self._encoding

    @encoding.setter
    def encoding(self, value: str) -> None:
        if value not in ENCODINGS:
            raise UsageError(f"position encoding must be one of {', '.join(ENCODINGS)}, got {value!r}")
        self._encoding = value

    def open(self, uri: str, text: str, version: int, language_id: str = "") -> None:
        self._docs[uri] = Document(uri, text, version, language_id)

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document:
        """The open document.

        Raises:
            UsageError: it is not open (the client sent no ``didOpen``).
        """
        doc = self._docs.get(uri)
        if doc is None:
            raise UsageError(f"{uri} is not open: the client must send textDocument/didOpen first")
        return doc

    def change(self, uri: str, version: int, changes: Iterable[Change]) -> None:
        """Apply ``changes`` in order, each to the text the previous one left (LSP's rule).

        Raises:
            UsageError: the document is not open.
        """
        doc = self.get(uri)
        text = doc.text
        for change in changes:
            if change.start is None or change.end is None:
                text = change.text
                continue
            start = self._offset(text, *change.start)
            end = max(start, self._offset(text, *change.end))
            text = text[:start] + change.text + text[end:]
        doc.text, doc.version = text, version

    def cursor(self, uri: str, line: int, character: int) -> Cursor:
        """Split the document at a position (clamped into it, see the module docstring).

        Raises:
            UsageError: the document is not open.
        """
        text = self.get(uri).text
        start, end, found = self._line_span(text, line)
        column = (end - start) if line > found else _column(text[start:end], character, self.encoding)
        line_prefix = text[start:start + column]
        match = _WORD_END.search(line_prefix)
        word = match.group() if match else ""
        character = _units(line_prefix, self.encoding)
        return Cursor(prefix=text[:start + column], suffix=text[start + column:], line=found, character=character,
                      line_prefix=line_prefix, word=word, word_start=character - _units(word, self.encoding))

    def _offset(self, text: str, line: int, character: int) -> int:
        start, end, found = self._line_span(text, line)
        return end if line > found else start + _column(text[start:end], character, self.encoding)

    @staticmethod
    def _line_span(text: str, line: int) -> tuple[int, int, int]:
        """(start, end) of ``line``'s text without its break, and its number; for a line past
        the end, those of the last line (the caller then takes its end)."""
        start, number = 0, 0
        for match in _LINE_BREAK.finditer(text):
            if number == max(line, 0):
                return start, match.start(), number
            start, number = match.end(), number + 1
        return start, len(text), number
