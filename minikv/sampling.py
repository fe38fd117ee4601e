"""TEMPORARY minimal sampling (replaced by the sampling branch)."""
from __future__ import annotations
from dataclasses import dataclass, field
import torch
from .errors import InvalidRequestError


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0")
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
