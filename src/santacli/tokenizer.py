"""A wrapper over ``tokenizers.Tokenizer``: EOS and FIM sentinels found in the vocabulary,
user text encoded with special tokens as plain text, and streaming decode.

The only module that imports ``tokenizers``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from santacli.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

EOS_TEXTS = ("<|endoftext|>",)
# Families of FIM sentinels: the spelling must be looked up, never assumed (a wrong spelling
# silently tokenizes as plain text).
FIM_FAMILIES = {
    "santacoder": ("<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"),
    "starcoder": ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"),
}


@dataclass(frozen=True)
class FimTokens:
    """Sentinel ids of one family, as found in the vocabulary."""

    family: str
    prefix: int
    middle: int
    suffix: int
    pad: int | None


class Tokenizer:
    """The model's own tokenizer with the ids santa needs to lay out prompts and stop."""

    def __init__(self, backend: object) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(backend, HFTokenizer):
            raise TypeError("backend must be a tokenizers.Tokenizer")
        self._tk = backend
        # User text that happens to spell a sentinel must stay plain text.
        self._tk.encode_special_tokens = True
        self._raw: HFTokenizer | None = None  # see encode_raw
        self._raw_lock = threading.Lock()
        self._vocab: dict[str, int] = self._tk.get_vocab(with_added_tokens=True)
        self.eos_id = next((self._vocab[t] for t in EOS_TEXTS if t in self._vocab), None)
        self.fim = self._find_fim()
        self.filename_id = self._vocab.get("<filename>")
        self.reponame_id = self._vocab.get("<reponame>")
        self.special_ids = frozenset(
            tok_id for tok_id, added in self._tk.get_added_tokens_decoder().items() if added.special
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: tokenizer.json not found") from None
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: cannot read tokenizer.json ({exc})") from None

    def _find_fim(self) -> FimTokens | None:
        for family, names in FIM_FAMILIES.items():
            ids = [self._vocab.get(n) for n in names]
            if ids[0] is not None and ids[1] is not None and ids[2] is not None:
                return FimTokens(family, ids[0], ids[1], ids[2], ids[3])
        return None

    @property
    def vocab_size(self) -> int:
        """Number of real tokens (the model's embedding may have padding rows beyond it)."""
        return max(self._vocab.values()) + 1

    @property
    def sentinel_ids(self) -> frozenset[int]:
        """Every special token id: any of them ends a completion."""
        return self.special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids for user text; special-token spellings are encoded as plain text."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """Token ids where spelled-out special tokens (``<fim-prefix>``...) become control tokens,
        as raw prompts from TGI/OpenAI clients that lay out FIM themselves expect."""
        with self._raw_lock:
            if self._raw is None:
                # A second backend with the other flag: flipping one shared flag per call would
                # race with encode() on the server's other threads.
                self._raw = type(self._tk).from_str(self._tk.to_str())
                self._raw.encode_special_tokens = False
        return self._raw.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self._tk.decode(ids, skip_special_tokens=True)

    def decode_with_specials(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens spelled out (``<fim-prefix>``...), as raw prompts
        for servers that lay out FIM from text are written."""
        return self._tk.decode(ids, skip_special_tokens=False)

    def token_to_id(self, text: str) -> int | None:
        return self._vocab.get(text)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text pieces as they arrive, never splitting a multi-byte character.

    Keeps a short window of ids; text is released only when the decoded window grows and does
    not end in U+FFFD, the mark of an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window used to give context to the decoder
        self._read = 0  # ids before this have been released as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        after = self._tok.decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes as U+FFFD)."""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        after = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]
