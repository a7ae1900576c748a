"""Byte-level byte-pair encoding (BPE), trained from scratch, in tiktoken's model.

The vocabulary is ``ranks``: token bytes -> id, and the id doubles as the merge priority
(rank). Text is first cut into chunks by a regex (words, numbers, punctuation runs, whitespace),
so no token ever spans two words. Each chunk's UTF-8 bytes start as single-byte tokens and the
adjacent pair whose *concatenated bytes* has the lowest rank is merged, again and again, until
no adjacent pair forms a token. That is exactly tiktoken's algorithm, so where tiktoken is
installed it does the encoding (in Rust, many times faster) and the pure-Python path here is
the readable reference that gives identical ids.

Training (``BPETokenizer.train``) starts from the 256 single bytes (ids 0..255 in byte order)
and repeatedly merges the most frequent adjacent pair of tokens into a new token, whose id is
the next free one: the order in which merges are learned is the rank order.
"""

from __future__ import annotations

import heapq
import os
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import regex
from tqdm import tqdm

from gptlab.errors import UserError, is_rust_panic
from gptlab.tokenizers.base import AllowedSpecial, Tokenizer, register

#: GPT-2's pre-tokenisation pattern: contractions, optional space + letters / digits /
#: other symbols, and whitespace runs that leave their last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: GPT-4's (tiktoken's ``cl100k_base``) pattern: case-insensitive contractions, digits in
#: groups of at most three, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

#: the named patterns `gptlab tokenizer train --pattern` accepts
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

#: the most ids a vocabulary may have (the largest in use have about 2^18)
MAX_VOCAB = 1 << 22

#: U+FFFD's UTF-8 bytes: what an id that is no token decodes to
REPLACEMENT = "\ufffd".encode("utf-8")

#: the pure-Python chunk cache is emptied when it grows past this many entries, which bounds
#: its memory on endless streams of distinct chunks while real text (which repeats) stays hot
_CHUNK_CACHE_LIMIT = 1 << 18

#: train() shows a progress bar by default for texts at least this long (when stderr is a tty)
_PROGRESS_MIN_CHARS = 1 << 20


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable rendering of bytes: byte -> one visible character.

    Printable Latin-1 bytes stand for themselves; the other 68 (space, control bytes, ...)
    are moved to U+0100 onwards in byte order, so a space shows as ``Ġ`` and a newline as ``Ċ``.
    Token files (OpenAI's ``encoder.json``, our tokenizer JSON) spell tokens this way.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return dict(sorted(mapping.items()))


def render_token(token: bytes) -> str:
    """Token bytes in GPT-2's printable spelling, e.g. ``b" the"`` -> ``"Ġthe"``."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def parse_token(spelling: str) -> bytes:
    """Invert ``render_token``; a character outside GPT-2's byte alphabet raises ``ValueError``."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in spelling)
    except KeyError as e:
        raise ValueError(f"token {spelling!r} contains {e.args[0]!r}, which is not in GPT-2's byte alphabet") from None


@lru_cache(maxsize=None)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _compile_pattern(pattern: str) -> regex.Pattern:
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"the pre-tokenisation pattern {pattern!r} is not a valid regex ({e})") from None
    if compiled.groups:
        # findall() would return the groups instead of the whole chunks.
        raise ValueError(f"the pre-tokenisation pattern {pattern!r} has capturing groups; write (?:...) instead")
    return compiled


def _without_surrogates(text: str) -> str:
    """Replace lone surrogates by U+FFFD and join surrogate pairs, as tiktoken does, so that
    text always has a UTF-8 encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def bpe_merge(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """Encode one pre-tokenised chunk with tiktoken's rule: while some adjacent pair of parts
    concatenates to a token, merge the pair whose concatenation has the lowest rank (the
    leftmost one on a tie).

    A heap of ``(rank, start offset)`` candidates keeps this O(n log n) in the chunk length
    (a long whitespace run or a CJK line is one chunk); candidates whose parts have changed
    since they were pushed are recognised when popped and skipped.
    """
    whole = ranks.get(piece)
    if whole is not None:
        return [whole]
    n = len(piece)
    # The parts form a linked list over byte offsets: the part starting at i ends at nxt[i].
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get(piece[i : i + 2])) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        if not alive[i] or nxt[i] == n:
            continue
        end = nxt[nxt[i]]
        if ranks.get(piece[i:end]) != rank:
            continue  # a neighbour was merged since this candidate was pushed
        alive[nxt[i]] = False
        nxt[i] = end
        if end < n:
            prv[end] = i
            if (r := ranks.get(piece[i : nxt[end]])) is not None:
                heapq.heappush(heap, (r, i))
        if (p := prv[i]) >= 0 and (r := ranks.get(piece[p:end])) is not None:
            heapq.heappush(heap, (r, p))
    out = []
    i = 0
    while i < n:
        out.append(ranks[piece[i : nxt[i]]])
        i = nxt[i]
    return out


@register
class BPETokenizer(Tokenizer):
    """Byte-level BPE: ``ranks`` maps token bytes to ids 0..n-1 (all 256 single bytes among them).

    ``special_tokens`` is either a mapping string -> id or an iterable of strings, which get the
    ids after the ordinary tokens. ``merges`` (pairs of ids, in the order learned) is kept for
    inspection; encoding needs only ``ranks``. With ``use_tiktoken=False`` (or without tiktoken
    installed) encoding runs in pure Python; both paths give the same ids.

    ``pattern`` (Python ``regex`` syntax) cuts text into chunks; like tiktoken, text that it
    does not match is dropped, so a pattern of your own must match every character.
    """

    kind = "bpe"

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        pattern: str = GPT2_PATTERN,
        special_tokens: Mapping[str, int] | Iterable[str] = (),
        merges: Sequence[tuple[int, int]] | None = None,
        *,
        name: str = "gptlab-bpe",
        use_tiktoken: bool = True,
    ):
        self.ranks: dict[bytes, int] = dict(ranks)
        n = len(self.ranks)
        # tiktoken's Rust core indexes a token by rank, and to_dict writes tokens in id order:
        # both need the ordinary ids to be exactly 0..n-1.
        if sorted(self.ranks.values()) != list(range(n)):
            raise ValueError("BPE token ids must be exactly 0..len(ranks)-1, each used once")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"BPE vocabulary lacks {len(missing)} single-byte tokens (first: "
                             f"{bytes([missing[0]])!r}); byte-level BPE needs all 256 to encode any text")
        self.pattern = pattern
        self._regex = _compile_pattern(pattern)
        if isinstance(special_tokens, Mapping):
            self.special_tokens = dict(special_tokens)
        else:
            self.special_tokens = {s: n + i for i, s in enumerate(dict.fromkeys(special_tokens))}
        clash = [s for s, i in self.special_tokens.items() if i < n]
        if clash or len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ValueError(f"special token ids must be distinct and at least {n} (after the ordinary tokens); "
                             f"bad: {clash or self.special_tokens}")
        self._vocab_size = max([n - 1, *self.special_tokens.values()]) + 1
        if self._vocab_size > MAX_VOCAB:  # the decoding table below has one entry per id
            raise ValueError(f"special token ids reach {self._vocab_size - 1}; ids must stay below {MAX_VOCAB}")
        # id -> bytes for decoding; ids between specials that name no token decode to U+FFFD.
        self._id_to_bytes = [REPLACEMENT] * self._vocab_size
        for token, i in self.ranks.items():
            self._id_to_bytes[i] = token
        for s, i in self.special_tokens.items():
            self._id_to_bytes[i] = s.encode("utf-8")
        if merges is not None:
            merges = [(int(a), int(b)) for a, b in merges]
            bad = next(((a, b) for a, b in merges if not (0 <= a < n and 0 <= b < n)
                        or self._id_to_bytes[a] + self._id_to_bytes[b] not in self.ranks), None)
            if bad is not None:
                raise ValueError(f"merge {bad} does not join two tokens into a token of the vocabulary")
        self.merges: list[tuple[int, int]] | None = merges
        self.name = name
        self.use_tiktoken = use_tiktoken
        self._tiktoken: Any = None  # built on first use; False once building it has failed
        self._chunk_cache: dict[str, list[int]] = {}

    # --- training ------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = GPT2_PATTERN,
        special_tokens: Iterable[str] = (),
        progress: bool | None = None,
    ) -> "BPETokenizer":
        """Learn ``vocab_size - len(special_tokens) - 256`` merges from ``text``.

        Each step merges the pair of adjacent tokens that occurs most often (summed over all
        chunks); a tie goes to the smallest ``(left id, right id)``, so training is
        deterministic. Merge ``i`` creates the token with id ``256 + i``. Special-token strings
        in ``text`` separate chunks and are never learned. If no pair occurs twice before the
        vocabulary is full, training stops with a warning and returns the smaller vocabulary.

        ``progress``: show a progress bar over merges (default: for long texts on a terminal).
        """
        specials = list(dict.fromkeys(special_tokens))
        minimum = 256 + len(specials)
        if vocab_size < minimum:
            raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
                            f"(256 byte tokens + {len(specials)} special tokens)")
        try:
            compiled = _compile_pattern(pattern)
        except ValueError as e:
            raise UserError(str(e)) from None
        text = _without_surrogates(text)
        pieces = [text]
        if specials:
            separator = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
            pieces = separator.split(text)
        # Real text repeats its words: learn on the distinct chunks, each weighted by its count.
        chunk_counts: Counter[str] = Counter()
        for piece in pieces:
            chunk_counts.update(compiled.findall(piece))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        if progress is None:
            progress = len(text) >= _PROGRESS_MIN_CHARS and sys.stderr.isatty()
        vocab, merges = _learn_merges(words, list(chunk_counts.values()), vocab_size - len(specials), progress)
        if len(vocab) + len(specials) < vocab_size:
            warnings.warn(f"the training text supports only {len(vocab) + len(specials)} tokens (no pair of tokens "
                          f"occurs twice any more), fewer than the {vocab_size} asked for; returning the smaller "
                          "vocabulary (train on more text for a larger one)", stacklevel=2)
        return cls({token: i for i, token in enumerate(vocab)}, pattern, specials, merges)

    # --- encoding and decoding -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        enc = self._tiktoken_encoding()
        if enc is not None:
            # disallowed_special=() makes tiktoken encode other special strings as plain text
            # (by default it raises), which is our contract.
            try:
                if not allowed:
                    return enc.encode_ordinary(text)
                return enc.encode(text, allowed_special=allowed, disallowed_special=())
            except BaseException as e:
                if not is_rust_panic(e):
                    raise
                raise UserError("this BPE tokenizer's tokens are inconsistent (its encoder failed on "
                                f"{text[:40]!r}); the tokenizer file is damaged: rebuild or re-download it") from None
        ids: list[int] = []
        for special, piece in self._split_special(_without_surrogates(text), allowed):
            if special:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self._encode_ordinary_pure(piece))
        return ids

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = ()) -> list[list[int]]:
        """Encode many texts; with tiktoken, on one thread per CPU core."""
        allowed = self._allowed(allowed_special)
        n_threads = min(os.cpu_count() or 1, len(texts))
        if self._tiktoken_encoding() is None or n_threads < 2:
            return [self.encode(t, allowed) for t in texts]
        # tiktoken releases the GIL while it encodes, so threads run in parallel. Each thread
        # gets one contiguous group of texts: tiktoken's own encode_batch makes a task per
        # text, and on many short texts that overhead made it slower than a plain loop.
        size = -(-len(texts) // n_threads)
        groups = [texts[i : i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(n_threads) as pool:
            done = pool.map(lambda group: [self.encode(t, allowed) for t in group], groups)
            return [ids for group in done for ids in group]

    def _encode_ordinary_pure(self, text: str) -> list[int]:
        cache, ranks = self._chunk_cache, self.ranks
        ids: list[int] = []
        for chunk in self._regex.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                if len(cache) >= _CHUNK_CACHE_LIMIT:
                    cache.clear()
                chunk_ids = cache[chunk] = bpe_merge(chunk.encode("utf-8"), ranks)
            ids.extend(chunk_ids)
        return ids

    def _tiktoken_encoding(self) -> Any:
        """tiktoken's ``Encoding`` for this vocabulary, or None for the pure-Python path."""
        if not self.use_tiktoken or self._tiktoken is False:
            return None
        if self._tiktoken is None:
            try:
                import tiktoken
            except ImportError:
                self._tiktoken = False
                return None
            try:
                self._tiktoken = tiktoken.Encoding(
                    self.name, pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
                )
            except ValueError as e:  # a pattern that tiktoken's Rust regex engine rejects
                warnings.warn(f"tiktoken cannot use this tokenizer ({e}); encoding in pure Python (slower)",
                              stacklevel=3)
                self._tiktoken = False
                return None
        return self._tiktoken

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        table, n = self._id_to_bytes, self._vocab_size
        return b"".join([table[i] if 0 <= i < n else REPLACEMENT for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8 string), e.g. to show how text was cut."""
        if not 0 <= token_id < self._vocab_size:
            raise UserError(f"token id {token_id} is outside this tokenizer's ids 0..{self._vocab_size - 1}")
        return self._id_to_bytes[token_id]

    # --- saving and loading ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Tokens in id order, spelled as in GPT-2's files (``"Ġthe"``); merges as ``"left right"``."""
        by_id = sorted(self.ranks, key=self.ranks.__getitem__)
        spelled = [render_token(t) for t in by_id]
        return {
            "pattern": self.pattern,
            "tokens": spelled,
            # A spelling never contains a space (space is "Ġ"), so "left right" is unambiguous.
            "merges": None if self.merges is None else [f"{spelled[a]} {spelled[b]}" for a, b in self.merges],
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BPETokenizer":
        try:
            tokens = [parse_token(s) for s in d["tokens"]]
            ranks = {t: i for i, t in enumerate(tokens)}
            if b"" in ranks:  # the encoder (tiktoken) would crash on it mid-encode
                raise ValueError("it has an empty token")
            if len(ranks) != len(tokens):
                dup = next(t for t, c in Counter(tokens).items() if c > 1)
                raise ValueError(f"token {render_token(dup)!r} appears more than once")
            merges = None
            if d.get("merges") is not None:
                merges = []
                for m in d["merges"]:
                    left, right = m.split(" ")
                    merges.append((ranks[parse_token(left)], ranks[parse_token(right)]))
            specials = {str(s): int(i) for s, i in d.get("special_tokens", {}).items()}
            return cls(ranks, d.get("pattern", GPT2_PATTERN), specials, merges)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field or token {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"the BPE tokenizer description is invalid ({what}); was it saved by gptlab?") from None


def _learn_merges(
    words: list[list[int]], counts: list[int], n_tokens: int, progress: bool
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Merge pairs in ``words`` (distinct chunks as byte ids, ``counts[i]`` occurrences each)
    until there are ``n_tokens`` tokens or no pair occurs twice. Returns (tokens by id, merges).

    Counting all pairs again after every merge would cost O(corpus) per merge. Instead we keep
    ``pair_counts`` and ``where`` (pair -> indices of the words it occurs in) up to date: a
    merge rewrites only the words that contain its pair. The most frequent pair comes off a
    max-heap of ``(-count, left, right)`` entries; counts only ever grow for pairs that contain
    the new token, and those are pushed afresh, while an entry whose count has since dropped
    is recognised when popped and pushed again with its current count (lazy deletion).
    """
    vocab = [bytes([b]) for b in range(256)]
    merges: list[tuple[int, int]] = []
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = tqdm(total=max(n_tokens - len(vocab), 0), desc="learning BPE merges", unit="token", disable=not progress)
    while len(vocab) < n_tokens and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg:
            if count:
                heapq.heappush(heap, (-count, a, b))
            continue
        if count < 2:
            break  # the heap's best pair occurs once: nothing left worth merging
        # The merged bytes are always a new token: a run of whole tokens is split the same way
        # wherever it occurs, so the earlier merge that made these bytes a token would have
        # joined this pair too.
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        bar.update()
        grown: set[tuple[int, int]] = set()
        for wi in where.pop((a, b)):
            w = words[wi]
            out: list[int] = []
            i, n = 0, len(w)
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) == n:
                continue  # the word lost this pair to an earlier merge; its index was stale
            c = counts[wi]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= c
            for pair in zip(out, out[1:]):
                pair_counts[pair] += c
                if new in pair:
                    where[pair].add(wi)
                    grown.add(pair)
            words[wi] = out
        del pair_counts[(a, b)]
        for pair in grown:
            heapq.heappush(heap, (-pair_counts[pair], *pair))
    bar.close()
    return vocab, merges
