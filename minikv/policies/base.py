"""What every eviction policy provides: decode-time kernel constants and a prefill-time ranking.

A policy acts at two moments:
- decode: the fused kernel scores every slot and picks the victim. The policy only chooses the kernel's
  compile-time constants (`eviction_spec`): which score rule, which victim rule, decay, walk, temperature.
- prefill: a chunk of C tokens arrives at a ring holding f. If f + C exceeds the budget, `budget` of the
  f + C candidates stay. The policy scores the candidates (`prefill_scores`) from what the prefill kernel
  measured (attention mass, the last rows' attention, edges, keys); sinks and the recent window are kept
  first, then the highest priorities.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..kernels.common import EvictionSpec


@dataclass
class PrefillCandidates:
    """Everything known about the f ring slots and C chunk tokens of one (sequence, layer) at a chunk.

    Per KV head H; the candidate axis n = f + C lists the ring slots first, then the chunk's tokens.
    """

    layer: int
    seed: int
    filled: int  # f
    budget: int  # slots the ring keeps (n_sink and window included)
    pos: torch.Tensor  # [H, n] original positions
    keys: torch.Tensor  # [H, n, D] K before RoPE, as the pool stores it
    mass: torch.Tensor  # [H, n] attention received from the chunk's rows (column sums, group mean)
    ring_score: torch.Tensor  # [H, f] the ring's scores before this chunk
    obs: torch.Tensor | None = None  # [H, rows, n] the last rows' attention (policies that ask)
    ring: int = -1  # the ring's id, for policies that keep per-ring state (nestedkv)
    values: torch.Tensor | None = None  # [H, n, D] V, for policies with needs_values (epikv-lag)
    edge_target: torch.Tensor | None = None  # [H, n, M] out-edges as indices into the candidate axis, -1 none
    edge_pos: torch.Tensor | None = None  # [H, n, M] each target's position when the edge was made (dead if changed)
    edge_w: torch.Tensor | None = None  # [H, n, M]
    ends_prompt: bool = False  # the chunk ends the prompt: after it the window's tokens leave it, one per decode step

    @property
    def chunk_len(self) -> int:
        return self.pos.shape[1] - self.filled

    def protected(self, n_sink: int, window: int) -> torch.Tensor:
        """[H, n] True for the candidates kept whatever their priority: the first n_sink positions and the
        `window` positions ending at the chunk's last token."""
        return self.sinks(n_sink) | (self.pos > self.pos[0, -1] - window)

    def sinks(self, n_sink: int) -> torch.Tensor:
        """[H, n] True for the first n_sink positions: protected at every step, decode's included."""
        return self.pos < n_sink


def _has_type(value: Any, hint: Any) -> bool:
    """Whether an option value fits its annotation. Floats must be finite: a NaN or infinite score
    constant silently corrupts every score it touches. bool is not accepted as a number."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arm) for arm in typing.get_args(hint))
    if origin is tuple:
        arms = typing.get_args(hint)
        return (isinstance(value, (tuple, list)) and len(value) == len(arms)
                and all(_has_type(v, arm) for v, arm in zip(value, arms)))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is int:
        return isinstance(value, numbers.Integral)
    if hint is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    if origin is tuple:
        arms = typing.get_args(hint)
        return f"tuple of {len(arms)} {_type_name(arms[0])}s"
    return {int: "integer", float: "finite number", bool: "true/false", type(None): "None"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _article(name: str) -> str:
    if name.startswith(("true", "None")):
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


@dataclass
class Policy:
    """Base class: n_sink first tokens and the `window` most recent are never evicted."""

    name: ClassVar[str] = "base"
    n_sink: int = 4
    window: int = 64
    # How many of the chunk's last rows of attention the prefill kernel must return (snapkv, tova).
    obs_rows: ClassVar[int] = 0
    # Out-edges recorded per token (nexus).
    top_m: ClassVar[int] = 0
    # The engine may give this policy fewer slots than the whole context (False only for `full`).
    evicts: ClassVar[bool] = True

    def __post_init__(self):
        self._check_option_types()
        for name in ("n_sink", "window"):
            self.require(name, getattr(self, name) >= 0, ">= 0")

    # --- options: the dataclass fields, checked against their annotations in one place -------------
    # Subclasses check their ranges in __post_init__ with `require`, after calling super().__post_init__().

    @classmethod
    def option_fields(cls) -> dict[str, Any]:
        """The options `make_policy` and `--policy name:key=value` accept: every field, with its type."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls) if f.init}

    @classmethod
    def describe_options(cls) -> str:
        """`nexus's options: decay (number, default 0.99), ...`, for error messages and --help."""
        own = [f for f in fields(cls) if f.init and f.name not in ("n_sink", "window")]
        if not own:
            return f"{cls.name} has no options of its own (n_sink and window are set with --n-sink/--window)"
        # f.type is the annotation as written in the class (`float`, `int | None`): `from __future__ import annotations`
        listed = ", ".join(f"{f.name} ({_annotation_text(f.type)}, default {f.default!r})" for f in own)
        return f"{cls.name}'s options: {listed}"

    def require(self, name: str, ok: bool, rule: str) -> None:
        """Raise a ConfigError naming option `name`, its value and `rule` unless `ok`."""
        if not ok:
            raise ConfigError(f"{self.name} option {name}={getattr(self, name)!r} is out of range: it must be "
                              f"{rule}{self._options_hint(name)}")

    def _options_hint(self, name: str) -> str:
        """The policy's own options, after an error about one of them (n_sink and window are everyone's)."""
        return "" if name in ("n_sink", "window") else f"; {self.describe_options()}"

    def _check_option_types(self) -> None:
        for name, hint in self.option_fields().items():
            value = getattr(self, name)
            if not _has_type(value, hint):
                raise ConfigError(f"{self.name} option {name}={value!r} is invalid: it must be "
                                  f"{_article(_type_name(hint))}{self._options_hint(name)}")
            if isinstance(value, list):  # a tuple option given as a list (from JSON, say)
                setattr(self, name, tuple(value))

    # EpiKV scores tokens from the residual stream: the runner collects each layer's input hidden state.
    needs_hidden_states: ClassVar[bool] = False
    # EpiKV-lag scores K and V features: prefill candidates then carry V as well.
    needs_values: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """The policy as `minikv run --policy` writes it: name, then the options that differ from the defaults."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                   if f.init and f.name not in ("n_sink", "window") and f.default is not MISSING
                   and getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(changed) if changed else "")

    def eviction_spec(self) -> EvictionSpec:
        raise NotImplementedError

    def prefill_scores(self, cand: PrefillCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores to store [H, n], keep priority [H, n]); a higher priority is kept first."""
        raise NotImplementedError

    def prefill_held(self, cand: PrefillCandidates, priority: torch.Tensor) -> torch.Tensor:
        """Under EvictionSpec.hold: [H, n] True for the candidates whose ring slots decode must not evict
        (PoolLayer.held), given prefill_scores' priority. Called for every chunk: it replaces the marks."""
        raise NotImplementedError(f"{self.name} has no held slots")

    # --- optional hooks for policies with their own state (epikv, nestedkv); the defaults do nothing ----
    # They are called by RingAttention (bind, reset_ring, new_token_scores, after_decode, after_prefill_chunk,
    # end_step) and by the engine (check_budget: at start for its budget, per request for kv_budget). A
    # "ring" here is a running request's ring, named by its batch slot; its slots are reached through its
    # block table (kernels.common.physical_rows). None of the hooks syncs with the host.

    def check_budget(self, budget: int, chunk: int) -> None:
        """Raise ConfigError if this policy cannot evict correctly with this budget and prefill chunk."""

    def bind(self, pool, num_slots: int, max_budget: int) -> None:
        """Called once with the KVPool, the number of batch slots and the largest ring: allocate per-(layer,
        slot, head) state."""

    def reset_ring(self, ring: int) -> None:
        """Slot `ring` now holds a new request (its first prefill chunk is about to run): forget its state."""

    def new_token_scores(self, layer: int, ring_ids: torch.Tensor, new_pos: torch.Tensor,
                         k_new: torch.Tensor) -> torch.Tensor | None:
        """SCORE_EXTERNAL: the decode tokens' scores [N, Hkv] written with them (None = 0)."""
        return None

    def after_decode(self, layer: int, pool, plan, written: torch.Tensor) -> None:
        """The decode kernel of `layer` (pool: its PoolLayer) wrote each new token into ring slot
        written[N, Hkv] of the rings of plan.decode_slots (block tables plan.decode_tables)."""

    def after_prefill_chunk(self, layer: int, pool, segment) -> None:
        """A prefill chunk (attention.PrefillSegment) has been written into its ring at `layer`."""

    def end_step(self, pool, plan, hidden_states: list[torch.Tensor] | None) -> None:
        """The forward of a step is done; hidden_states holds each layer's input [T, hidden] when
        needs_hidden_states is set (rows in the step's flat order: decodes first, then prefill chunks)."""

    def _spec(self, **constants) -> EvictionSpec:
        return EvictionSpec(n_sink=self.n_sink, window=self.window, top_m=self.top_m, **constants)
