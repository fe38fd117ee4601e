"""Haystacks for synthetic long-context tasks: filler text of a chosen token length, and needle insertion.

Two sources, both available offline on every machine:

- ``repeated``: a handful of neutral sentences repeated in a fixed order, in the spirit of the "noise"
  haystack of RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv 2404.06654). It carries no information, so a needle stands out sharply.
- ``prose``: natural English paragraphs cleaned from the Python documentation topics that ship with the
  standard library (``pydoc_data.topics``). Real prose makes attention patterns look like real use and
  gives a long natural text for the perplexity signal.

Text is cut at word granularity (as RULER does with its essay haystack) so that a prompt can hit a token
target within a few tokens; needles go in at sentence boundaries so they never split a sentence.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Callable, Protocol, Sequence

from minikv.errors import ConfigError

HAYSTACK_SOURCES = ("prose", "repeated")

# Neutral statements with no numbers, no capitalised codes and no question-like content, so nothing in
# them can be mistaken for a needle, a key or an answer.
REPEATED_SENTENCES = (
    "The river runs slowly past the old mill.",
    "Clouds drift over the quiet hills.",
    "A cup of tea cools on the table.",
    "The path bends around the garden wall.",
    "Birds gather on the roof at dusk.",
    "The library stays open until evening.",
    "Rain taps softly against the window.",
)

# A paragraph is rejected when it contains runs of five or more digits: needle values are such runs, and
# the prompt must hold each value exactly once.
_LONG_DIGIT_RUN = re.compile(r"\d{5,}")
_FOOTNOTE_MARK = re.compile(r"\s*\[\d+\]")
_HEADING_UNDERLINE = re.compile(r"^[*=\-~^#]{3,}$")
_WORD_WITH_SPACE = re.compile(r"\S+\s*")
# A sentence ends with . ! or ? (optionally closed by a quote or bracket) and the next one starts after
# whitespace; that whitespace is where a needle may go.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]?\s+")


class TokenizerLike(Protocol):
    """Anything with a Hugging Face style ``encode``; the task generators need nothing else."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


TokenCounter = Callable[[str], int]


def token_counter(tokenizer: TokenizerLike) -> TokenCounter:
    """Return a function that counts the tokens of a text without special tokens (BOS/EOS)."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _is_plain_prose(block: str) -> bool:
    """True for a documentation block that reads as English prose (not code, grammar, table or heading)."""
    lines = block.split("\n")
    if any(line[:1].isspace() for line in lines):
        return False  # indented: code example, list continuation or quoted block
    if any(_HEADING_UNDERLINE.match(line.strip()) for line in lines):
        return False
    if "::=" in block or "|" in block or ">>>" in block or block.startswith(("-[", "* ", "+")):
        return False
    if _LONG_DIGIT_RUN.search(block):
        return False
    return True


def _clean_paragraph(block: str) -> str:
    """Join a block's lines into one paragraph of plain text."""
    text = " ".join(line.strip() for line in block.split("\n"))
    # The documentation wraps lines at hyphens ("built-\nin"); rejoin those words.
    text = re.sub(r"(?<=\w-) (?=[a-z])", "", text)
    text = _FOOTNOTE_MARK.sub("", text)
    text = text.replace("*", "")  # reStructuredText emphasis markers around words
    return re.sub(r"\s+", " ", text).strip()


def _looks_like_sentences(paragraph: str) -> bool:
    words = paragraph.split()
    letters = sum(ch.isalpha() for ch in paragraph)
    visible = sum(not ch.isspace() for ch in paragraph)
    return len(words) >= 12 and paragraph.endswith(".") and letters >= 0.8 * visible


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """English paragraphs from the standard library's documentation topics, in a fixed order.

    The topics are read in sorted order of their names, so the result is the same on every run of the
    same Python version (another Python version ships slightly different documentation).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions package the documentation topics separately
        raise ConfigError(
            "the 'prose' haystack needs the standard library module pydoc_data, which this Python lacks; "
            "install your distribution's Python documentation package or use haystack='repeated'"
        ) from exc
    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            block = block.strip("\n")
            if block and _is_plain_prose(block):
                paragraph = _clean_paragraph(block)
                if _looks_like_sentences(paragraph):
                    paragraphs.append(paragraph)
    return tuple(paragraphs)


def _source_text(source: str) -> str:
    """The whole text of a haystack source, one cycle of it."""
    if source == "prose":
        return "\n\n".join(prose_paragraphs())
    if source == "repeated":
        return " ".join(REPEATED_SENTENCES)
    raise ConfigError(f"unknown haystack {source!r}; choose one of {', '.join(HAYSTACK_SOURCES)}")


@functools.lru_cache(maxsize=len(HAYSTACK_SOURCES))
def _source_words(source: str) -> tuple[str, ...]:
    """The source split into words that keep their trailing whitespace, so joining them restores it."""
    # The separator after the last word makes the end of one cycle join the start of the next like any
    # other sentence boundary (a paragraph break for prose, a space for the repeated sentences).
    separator = "\n\n" if source == "prose" else " "
    return tuple(_WORD_WITH_SPACE.findall(_source_text(source) + separator))


def _sentence_starts(words: Sequence[str]) -> list[int]:
    """Indices of the words that begin a sentence (a seeded start offset is snapped to one of these)."""
    starts = [0]
    for index, word in enumerate(words[:-1]):
        if _SENTENCE_BREAK.search(word):
            starts.append(index + 1)
    return starts


class HaystackStream:
    """An endless, seeded stream of haystack words: the source read cyclically from a sentence start.

    ``text(n)`` is the first ``n`` words; a longer prefix always extends a shorter one, which is what makes
    fitting a prompt to a token count a one-dimensional search over ``n``.
    """

    def __init__(self, source: str, seed: int):
        self.source = source
        self._words = _source_words(source)
        rng = random.Random(f"haystack:{source}:{seed}")
        # The repeated source always starts at its first sentence: its order is part of its identity.
        self._offset = rng.choice(_sentence_starts(self._words)) if source == "prose" else 0

    def words(self, count: int) -> list[str]:
        cycle = len(self._words)
        return [self._words[(self._offset + i) % cycle] for i in range(count)]

    def text(self, count: int) -> str:
        return "".join(self.words(count)).rstrip()


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence begins, plus the end if the text ends a sentence.

    These are the places a needle may go. A text cut at a word boundary usually ends inside a sentence;
    its end is then no boundary, so a needle never completes a half sentence.
    """
    boundaries = [0] + [match.end() for match in _SENTENCE_BREAK.finditer(text) if match.end() < len(text)]
    if re.search(r"[.!?][\"')\]]?$", text) and len(text) > 0:
        boundaries.append(len(text))
    return boundaries


def insert_at_depths(text: str, needles: Sequence[tuple[float, str]]) -> str:
    """Insert each ``(depth, sentence)`` needle at the sentence boundary nearest to ``depth`` of the text.

    ``depth`` is a fraction in [0, 1] of the text's length (0 = before the first sentence, 1 = after the
    last). Needles that land on the same boundary keep their given order. Each needle is separated from
    its neighbours by a single space (or by the paragraph break that was already there).
    """
    boundaries = sentence_boundaries(text)
    placed: dict[int, list[str]] = {}
    for depth, needle in needles:
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"needle depth {depth} is outside [0, 1]")
        target = depth * len(text)
        boundary = min(boundaries, key=lambda offset: abs(offset - target))
        placed.setdefault(boundary, []).append(needle)
    pieces = []
    previous = 0
    for boundary in sorted(placed):
        pieces.append(text[previous:boundary])
        block = " ".join(placed[boundary])
        # Interior boundaries already carry the whitespace after the previous sentence; the end of the
        # text does not (it is stripped), so a needle there gets its own space.
        if boundary == len(text) and boundary > 0:
            pieces.append(" " + block)
        else:
            pieces.append(block + " " if boundary < len(text) else block)
        previous = boundary
    pieces.append(text[previous:])
    return "".join(pieces)


def fit_length(
    build: Callable[[int], str], count_tokens: TokenCounter, target_tokens: int, max_units: int
) -> tuple[str, int, int]:
    """Find the unit count ``n`` whose ``build(n)`` measures closest to ``target_tokens``.

    ``build`` must grow (roughly monotonically) with ``n``; a binary search finds the largest ``n`` whose
    text does not exceed the target, then its successor is compared, costing about log2(max_units)
    encodes. Returns ``(text, n, measured_tokens)``.
    """
    low, high = 0, max_units
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(build(middle)) <= target_tokens:
            low = middle
        else:
            high = middle - 1
    best = None
    for units in sorted({low, min(low + 1, max_units)}):
        text = build(units)
        measured = count_tokens(text)
        if best is None or abs(measured - target_tokens) < abs(best[2] - target_tokens):
            best = (text, units, measured)
    return best


def haystack_text(source: str, count_tokens: TokenCounter, target_tokens: int, seed: int) -> str:
    """Haystack text of about ``target_tokens`` tokens (as measured by ``count_tokens``), seeded."""
    stream = HaystackStream(source, seed)
    text, _, _ = fit_length(stream.text, count_tokens, target_tokens, max_units=target_tokens)
    return text
