"""The request bodies of `minikv serve`, in OpenAI's shape, and how each becomes the engine's SamplingParams.

Field names and meanings are OpenAI's (`/v1/completions`, `/v1/chat/completions`) plus vLLM's extensions
sent in the body (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, include_stop_str_in_output) and minikv's `kv_budget`. Types are checked strictly (a
string is not a number, `true` is not 1); ranges are left to SamplingParams and the engine, which know
them and say why. Fields this server does not use (`user`, `logit_bias`, ...) are accepted and ignored;
features it does not have (n > 1, echo, suffix, tools) are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import RequestOutputKind, SamplingParams
from .errors import bad_request

# OpenAI's default for /v1/completions; chat defaults to what is left of max_model_len after the prompt.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class OpenAIBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class SamplingFields(OpenAIBody):
    """The fields both endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # minikv's: the most KV slots per layer and KV head this request may hold (None: the engine's budget)
    kv_budget: int | None = None
    # minikv's: the positions RoPE gives the ring's tokens, "original" or "ring" (None: the engine's)
    positions: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n={self.n} is not supported: minikv returns one choice per request; send n "
                              "requests instead", "n")

    def sampling_params(self, *, max_tokens: int, logprobs: int | None, stream: bool) -> SamplingParams:
        """SamplingParams for this body; fields left out keep SamplingParams' defaults (vLLM's)."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty") if getattr(self, name) is not None}
        return SamplingParams(
            **given, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, seed=self.seed,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            kv_budget=self.kv_budget, positions=self.positions,
            # A stream sends each output as it comes: only what is new. A plain response needs only the end.
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)

    def request_field(self, engine_field: str | None) -> str | None:
        """The name, in this body, of a SamplingParams / engine field (see the subclasses)."""
        return engine_field


class CompletionRequest(SamplingFields):
    """POST /v1/completions: raw text (or token ids) in, continuation out; no chat template."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise bad_request(f"prompt holds {len(self.prompt)} prompts; minikv takes one prompt per request", "prompt")
        if self.echo:
            raise bad_request("echo=true is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported (no fill-in-the-middle)", "suffix")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of={self.best_of} is not supported: minikv returns one choice", "best_of")

    def engine_prompt(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt

    def to_sampling_params(self, max_model_len: int) -> tuple[SamplingParams, bool]:
        """SamplingParams, and whether max_tokens is to be fitted to the prompt (never: OpenAI's default is 16)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        return self.sampling_params(max_tokens=max_tokens, logprobs=self.logprobs, stream=self.stream), False


class TextPart(OpenAIBody):
    type: str = "text"
    text: str


class ChatMessage(OpenAIBody):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_engine_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content if part.type == "text")
        return {"role": self.role, "content": content if content is not None else ""}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: messages through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported by minikv", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")

    def engine_prompt(self) -> list[dict]:
        return [message.as_engine_message() for message in self.messages]

    def to_sampling_params(self, max_model_len: int) -> tuple[SamplingParams, bool]:
        """SamplingParams, and whether max_tokens is to be fitted to the prompt: with neither max_tokens nor
        max_completion_tokens, a chat answer may use what is left of max_model_len (as OpenAI and vLLM);
        that needs the prompt's length, which the engine thread works out (see EngineLoop)."""
        asked = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.sampling_params(max_tokens=asked if asked is not None else max_model_len, logprobs=logprobs, stream=self.stream)
        return params, asked is None

    def request_field(self, engine_field: str | None) -> str | None:
        if engine_field == "prompt":
            return "messages"
        if engine_field == "logprobs":
            return "top_logprobs"
        if engine_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return engine_field


def field_names() -> set[str]:
    """Every field name of the request bodies (to read pydantic's error locations)."""
    names: set[str] = set()
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions):
        names.update(model.model_fields)
    return names
