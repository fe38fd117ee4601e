"""The request bodies of `minikv serve`, in OpenAI's shape, and how each becomes the engine's SamplingParams.

Field names and meanings are OpenAI's (`/v1/completions`, `/v1/chat/completions`) plus vLLM's extensions
sent in the body (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, include_stop_str_in_output, chat_template_kwargs) and minikv's `kv_budget`. Types
are checked strictly (a string is not a number, `true` is not 1, NaN and infinity are not numbers); ranges
are left to SamplingParams and the engine, which know them and say why. Fields this server does not use
(`user`, `logit_bias`, ...) are accepted and ignored; features it does not have (n > 1, suffix, tools) are
refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import RequestOutputKind, SamplingParams
from .errors import bad_request

# OpenAI's default for /v1/completions; chat's default comes from the prompt (Server.default_max_tokens).
DEFAULT_COMPLETION_MAX_TOKENS = 16


class OpenAIBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(OpenAIBody):
    model_config = ConfigDict(strict=True, extra="forbid")  # a small closed set: a misspelt option is a mistake

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, usage comes at the end only


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
    # minikv's: tokens of this request's KV archive, recalled by its queries (0: none; minikv.archive)
    archive_budget: int = 0

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n={self.n} is not supported: minikv returns one choice per request; send n "
                              "requests instead", "n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")

    def sampling_params(self, *, max_tokens: int, logprobs: int | None, stream: bool) -> SamplingParams:
        """SamplingParams for this body; fields left out keep SamplingParams' defaults (vLLM's)."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty") if getattr(self, name) is not None}
        return SamplingParams(
            **given, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, seed=self.seed,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            kv_budget=self.kv_budget, positions=self.positions, archive_budget=self.archive_budget,
            # A stream sends each output as it comes: only what is new. A plain response needs only the end.
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)

    def request_field(self, engine_field: str | None) -> str | None:
        """The name, in this body, of a SamplingParams / engine field (see the subclasses)."""
        return engine_field


# The most prompts one /v1/completions request may batch (lm-evaluation-harness sends its batch size).
MAX_PROMPTS_PER_REQUEST = 256


class CompletionRequest(SamplingFields):
    """POST /v1/completions: raw text (or token ids) in, continuation out; no chat template.

    `prompt` is one prompt (text or token ids) or a batch of them (a list of texts or of token-id lists): each
    becomes its own engine request and its own choice (index = its place in the batch). `echo` puts the prompt
    before the completion, in the text and, with `logprobs`, in the logprobs (every prompt token's logprob
    under the model, the first one null): this is how lm-evaluation-harness scores a continuation, with
    `max_tokens: 0` (allowed with echo only) to score without generating.
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        prompts = self.engine_prompts()
        if not prompts:
            raise bad_request("prompt is an empty list; give a prompt (text or token ids)", "prompt")
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS_PER_REQUEST} per request",
                              "prompt")
        empty = [i for i, prompt in enumerate(prompts) if len(prompt) == 0]
        if empty:
            where = "prompt" if len(prompts) == 1 else f"prompt[{empty[0]}]"
            raise bad_request(f"{where} is empty; give at least one token of text", "prompt")
        if len(prompts) > 1 and self.stream:
            raise bad_request(f"prompt holds {len(prompts)} prompts and stream=true: a stream takes one prompt "
                              "(send one streamed request per prompt)", "stream")
        if self.suffix:
            raise bad_request("suffix is not supported (no fill-in-the-middle)", "suffix")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of={self.best_of} is not supported: minikv returns one choice", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens=0 asks for no completion: it is allowed only with echo=true (to score the "
                              "prompt); max_tokens must be >= 1", "max_tokens")

    def engine_prompts(self) -> list[str | list[int]]:
        """The prompts of this request, each text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def engine_prompt(self) -> str | list[int]:
        return self.engine_prompts()[0]

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) only; the engine samples one token, dropped."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, max_model_len: int) -> tuple[SamplingParams, bool]:
        """SamplingParams, and whether max_tokens is to be fitted to the prompt (never: OpenAI's default is 16)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        params = self.sampling_params(max_tokens=1 if self.echo_only else max_tokens, logprobs=self.logprobs,
                                      stream=self.stream)
        if self.echo and self.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=self.logprobs)
        return params, False


class TextPart(OpenAIBody):
    type: str = "text"
    text: str | None = None


class ChatMessage(OpenAIBody):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_engine_message(self) -> dict:
        """The message as the chat template reads it; `developer` (OpenAI's newer name for the system role)
        becomes `system`, which is what chat templates know."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content if part.type == "text")
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content if content is not None else ""}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: messages through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    # vLLM's: extra variables for the chat template, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported by minikv", "tools")
        for index, message in enumerate(self.messages):
            for part_index, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{index}].content[{part_index}] is a {part.type!r} part; minikv "
                                      "takes text only ({'type': 'text', 'text': ...})",
                                      f"messages[{index}].content[{part_index}]")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        reserved = sorted(set(self.chat_template_kwargs or {}) & {"messages", "add_generation_prompt"})
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets those",
                              "chat_template_kwargs")

    def engine_prompt(self) -> list[dict]:
        return [message.as_engine_message() for message in self.messages]

    def to_sampling_params(self, max_model_len: int) -> tuple[SamplingParams, bool]:
        """SamplingParams, and whether max_tokens is to be fitted to the prompt: with neither max_tokens nor
        max_completion_tokens, a chat answer may use what is left of max_model_len (as OpenAI and vLLM; under
        positions "ring", max_model_len: Server.default_max_tokens);
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
