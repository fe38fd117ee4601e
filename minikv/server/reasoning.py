"""Reasoning parsers: a reasoning model's `<think>...</think>` text moved out of the answer, as vLLM does.

`minikv serve --reasoning-parser NAME` makes chat responses carry the thinking in
`message.reasoning_content` (and streamed deltas in `delta.reasoning_content`), the answer alone in
`content`. The names are vLLM's:

- `deepseek_r1`: DeepSeek-R1's chat template opens `<think>` in the prompt, so the output starts inside the
  reasoning: everything before the first `</think>` is reasoning (a leading `<think>` the model repeats is
  dropped), the rest is content; an output with no `</think>` (cut off by max_tokens) is all reasoning.
- `qwen3`: Qwen3 writes `<think>` itself when it thinks (with `enable_thinking: false` its template closes
  an empty think block in the prompt and the output is plain content): text between `<think>` and `</think>`
  is reasoning, an output that does not start with `<think>` is all content, and one whose `</think>` never
  came (cut off) is all reasoning after `<think>`.

A stream sees the text in deltas whose boundaries fall anywhere, even inside a tag (`</thi` + `nk>`):
`ReasoningStream` holds back text that could still be the start of a tag until the next delta decides it.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    """Splits a whole output into (reasoning, content); None where a part is absent."""

    name = ""
    starts_in_reasoning = False  # whether the prompt already opened the think block

    def split(self, text: str, final: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, content) of `text`. With final=False (a stream's text so far), text that may be the
        start of a tag is left out of both, so that each part only grows as text is added."""
        body = text
        if body.startswith(START):
            body = body[len(START):]
        elif not final and START.startswith(body) and body:
            return None, None  # "<thi": a start tag or not, the next delta says
        elif not self.starts_in_reasoning:
            return None, text  # no think block: all content
        end = body.find(END)
        if end < 0:
            return (body if final else body[: len(body) - _partial_tag_length(body, END)]) or None, None
        return body[:end] or None, body[end + len(END):] or None


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True


class Qwen3Parser(ReasoningParser):
    name = "qwen3"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {cls.name: cls for cls in (DeepSeekR1Parser, Qwen3Parser)}


def make_reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()


class ReasoningStream:
    """One streamed answer: `feed(delta)` returns the (reasoning, content) text that is new since the last
    call, `finish()` what was held back at the end."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self._sent = [0, 0]  # characters of reasoning and of content already returned

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        parts = self.parser.split(self.text, final=final)
        new = []
        for i, part in enumerate(parts):
            part = part or ""
            new.append(part[self._sent[i]:])
            self._sent[i] = max(self._sent[i], len(part))
        return new[0], new[1]

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
