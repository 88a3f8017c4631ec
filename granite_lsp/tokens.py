"""Tokenizer access: literal encoding of user text, the Granite control tokens, and token bytes.

Granite's FIM tokens are ordinary added tokens (not marked special), so a naive ``encode`` would turn a
literal ``<|fim_middle|>`` typed in a buffer into the control token and derail the prompt. User text is
therefore always encoded *literally*; control tokens are looked up by their strings and spliced in.
"""

from __future__ import annotations

import bisect
import itertools
import re
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

END_OF_TEXT = "<|end_of_text|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
FILENAME = "<|filename|>"
REPONAME = "<|reponame|>"
CONTROL_TOKENS = (END_OF_TEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, FILENAME, REPONAME)

_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with lone surrogates as U+FFFD, one code point for one, so that offsets stay valid.

    An editor's UTF-16 buffer may hold lone surrogates, and JSON carries them as escapes; UTF-8 (and so
    the tokenizer, which raised on them) cannot. The model never sees them; every other character, and
    every offset into the text, is unchanged.
    """
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE vocabularies."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


@dataclass(frozen=True)
class ControlIds:
    eos: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    fim_pad: int
    filename: int
    reponame: int

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation ends on EOS and on every control token: none of them can be part of a middle."""
        return frozenset(
            (self.eos, self.fim_prefix, self.fim_middle, self.fim_suffix, self.fim_pad, self.filename, self.reponame)
        )


class TokenizerError(ValueError):
    pass


class TokenBytes:
    """Every token's bytes, indexed by id, in one buffer: a 100k-token vocabulary as 100k bytes
    objects (and the garbage of building them) held ~20 MB of the server's memory; this a few MB."""

    def __init__(self, parts: list[bytes]) -> None:
        self._blob = b"".join(parts)
        self._ends = array("I", itertools.accumulate(map(len, parts)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> bytes:
        end = self._ends[i]  # IndexError past the end, like a list
        i %= len(self._ends)
        return self._blob[self._ends[i - 1] if i else 0 : end]


class TextTokenizer:
    """A byte-level BPE tokenizer with the Granite control tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        ids = {}
        for name in CONTROL_TOKENS:
            tid = tokenizer.token_to_id(name)
            if tid is None:
                raise TokenizerError(f"the tokenizer has no {name} token; this is not a Granite FIM tokenizer")
            ids[name] = tid
        self.control = ControlIds(
            eos=ids[END_OF_TEXT],
            fim_prefix=ids[FIM_PREFIX],
            fim_middle=ids[FIM_MIDDLE],
            fim_suffix=ids[FIM_SUFFIX],
            fim_pad=ids[FIM_PAD],
            filename=ids[FILENAME],
            reponame=ids[REPONAME],
        )
        self._added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        return cls(Tokenizer.from_file(str(file)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` taken literally: never produces a control or other added token."""
        if not text:
            return []
        text = encodable(text)
        if not any(a in text for a in self._added):
            return self._tok.encode(text, add_special_tokens=False).ids
        return [tid for piece, _ in self.pretokenize(text) for tid in self._model_ids(piece)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus the character span each token covers (spans of a multi-byte char may repeat)."""
        text = encodable(text)
        if any(a in text for a in self._added):
            ids, offs = [], []
            for piece, (start, end) in self.pretokenize(text):
                for tid in self._model_ids(piece):
                    ids.append(tid)
                    offs.append((start, end))
            return ids, offs
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _model_ids(self, bytelevel_piece: str) -> list[int]:
        return [t.id for t in self._tok.model.tokenize(bytelevel_piece)]

    def pretokenize(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        """The pre-tokenizer's pieces (in byte-level alphabet) with their character spans."""
        pre = self._tok.pre_tokenizer
        if pre is None:
            raise TokenizerError("tokenizer has no pre-tokenizer")
        pieces: list[tuple[str, tuple[int, int]]] = pre.pre_tokenize_str(encodable(text))
        return pieces

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    def prepare(self) -> None:
        """Build the byte tables now (a second or so, ~25 MB of garbage on a 100k vocabulary) rather
        than in the first completion, when the process is at its largest."""
        _ = self.token_bytes, self._sorted_ids

    @cached_property
    def token_bytes(self) -> TokenBytes:
        """Raw bytes of every token id; control tokens map to b'' (they are never text)."""
        dec = _byte_decoder()
        parts: list[bytes] = [b""] * self.vocab_size
        for tok, tid in self._tok.get_vocab(with_added_tokens=False).items():
            if tid < len(parts):
                parts[tid] = bytes(dec[c] for c in tok) if all(c in dec for c in tok) else tok.encode()
        for tid, added in self._tok.get_added_tokens_decoder().items():
            if tid < len(parts):
                parts[tid] = b"" if added.content in CONTROL_TOKENS or added.special else added.content.encode()
        return TokenBytes(parts)

    @cached_property
    def _sorted_ids(self) -> array[int]:
        """Ids of the text tokens ordered by their bytes (for prefix searches by bisection)."""
        table, control = self.token_bytes, self.control.stop_ids
        return array(
            "I", sorted((i for i in range(len(table)) if table[i] and i not in control), key=table.__getitem__)
        )

    def ids_consistent_with(self, pending: bytes) -> list[int]:
        """Token ids whose bytes could begin text that starts with ``pending``.

        That is, tokens that start with ``pending`` or are a (non-empty) prefix of it; used to decode the
        bytes handed back by token healing without ever contradicting what the user typed.
        """
        table, order = self.token_bytes, self._sorted_ids
        lo = bisect.bisect_left(order, pending, key=table.__getitem__)
        upper = pending.rstrip(b"\xff")
        hi = (
            bisect.bisect_left(order, upper[:-1] + bytes([upper[-1] + 1]), key=table.__getitem__)
            if upper
            else len(order)
        )
        out = list(order[lo:hi])
        for k in range(1, len(pending)):
            prefix = pending[:k]
            i = bisect.bisect_left(order, prefix, key=table.__getitem__)
            if i < len(order) and table[order[i]] == prefix:
                out.append(order[i])
        return out
