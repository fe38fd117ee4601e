"""EpiKV (arXiv 2606.26472) and its lag-normalised KV variant, as ring policies. Neither reads attention.

From the paper (only its abstract is public): eviction without attention and without keys: a token's
importance is how much its hidden state changes across layers, lower-mid layers counting positively and
upper-mid layers negatively, detrended with a causal rolling z-score; the score is fixed when the token is
written. A second variant scores each (layer, head)'s K/V features normalised by the channel-wise range of the
next lag chunk (lag 128), by their spread across channels; a token waits unscored for one lag.

minikv's concrete choices are in the two class docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..kernels.common import SCORE_EXTERNAL, VICTIM_MIN_SCORE, physical_rows
from .base import Policy, PrefillCandidates

_EPS = 1e-6
# The score of a token that is not scored yet (epikv-lag): above any real score, so never the argmin while a
# scored token is unprotected (the capped lag makes sure one always is); finite, so ties go to the lowest slot.
PENDING = 1e30


# --- EpiKV: hidden-state change across layers ---------------------------------------------------------


def layer_bands(num_transitions: int, lower: tuple[float, float], upper: tuple[float, float]):
    """Transition indices (l -> l+1) of the two bands, as fractions of depth; each non-empty where possible."""
    cut = lambda x: int(x * num_transitions)  # noqa: E731
    lo_start = min(cut(lower[0]), max(num_transitions - 1, 0))
    lo_end = min(max(cut(lower[1]), lo_start + 1), num_transitions)
    up_start = max(cut(upper[0]), lo_end)
    up_end = min(max(cut(upper[1]), up_start + 1), num_transitions)
    return range(lo_start, lo_end), range(up_start, up_end)


def hidden_change_scores(layer_inputs: list[torch.Tensor], lower=(0.25, 0.5), upper=(0.5, 0.75)) -> torch.Tensor:
    """EpiKV's raw score per token [T] from each layer's input hidden state [T, hidden] (L of them).

    d_l = |h_{l+1} - h_l| / |h_l| is the relative change of transition l; raw = mean of d over the lower-mid
    band - mean of d over the upper-mid band (a band left empty by a very shallow model counts 0).
    """
    num_transitions = len(layer_inputs) - 1
    if num_transitions < 1:
        raise ConfigError("epikv needs a model with at least two layers (it scores changes between layers)")
    low, up = layer_bands(num_transitions, lower, upper)

    def band_mean(band):
        if len(band) == 0:
            return torch.zeros(layer_inputs[0].shape[0], device=layer_inputs[0].device)
        changes = [relative_change(layer_inputs[i], layer_inputs[i + 1]) for i in band]
        return torch.stack(changes).mean(0)

    return band_mean(low) - band_mean(up)


def relative_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    before, after = before.float(), after.float()
    return (after - before).norm(dim=-1) / (before.norm(dim=-1) + _EPS)


def causal_zscore(values: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """z of every element against the `window` elements ending at it (itself included), invalid ones skipped.

    values, valid [n] -> z [n] (fp64). Fewer than two valid values in the window give z = 0.
    """
    x = torch.where(valid, values.double(), torch.zeros_like(values, dtype=torch.float64))
    w = valid.double()

    def trailing_sum(t):
        c = torch.cat([t.new_zeros(1), t.cumsum(0)])
        start = (torch.arange(1, len(t) + 1, device=t.device) - window).clamp(min=0)
        return c[1:] - c[start]

    count, total, squares = trailing_sum(w), trailing_sum(x), trailing_sum(x * x)
    return _zscore(x, count, total, squares)


def _zscore(x, count, total, squares):
    mean = total / count.clamp(min=1)
    var = (squares / count.clamp(min=1) - mean * mean).clamp(min=0)
    z = (x - mean) / (var.sqrt() + _EPS)
    return torch.where(count >= 2, z, torch.zeros_like(z))


@dataclass
class EpiKV(Policy):
    """EpiKV: keep the tokens whose hidden state the lower-mid layers rewrite most (arXiv 2606.26472).

    minikv's concrete choices:
    - The change of transition l (input of layer l -> input of layer l+1) is |h_{l+1} - h_l| / |h_l|; the
      relative change, because the residual stream's norm grows with depth.
    - Bands, as fractions of the depth: lower-mid [0.25, 0.5) counts +, upper-mid [0.5, 0.75) counts -, each
      averaged. The first quarter is lexical processing that moves every token a lot, whatever it means; the
      last quarter turns each state into a prediction of the *next* token. In between, a token that the
      lower-mid layers rewrite strongly is one that gathers context (keep it), while one that is still being
      rewritten in the upper-mid layers has not settled into a stable representation (a weaker keep signal).
      SmolLM2-135M (30 layers, 29 transitions): transitions 7-13 count +, 14-20 count -.
    - A token's score is the same for every (layer, KV head): it is a property of the token.
    - Detrending: z against the `zscore_window` (128) raw scores ending at the token, its own included; a
      per-ring history of the last raw scores is kept (fp64, zscore_window values per ring).
    - Scores need the whole forward, so a token is written with a provisional score and its final score is set
      after the forward (`end_step`): decode tokens through the slot the kernel reports (`written`), prefill
      tokens by matching positions. Nothing can evict a token before then.
    - Prefill with eviction keeps all of the chunk (its scores do not exist yet) and evicts among the ring's
      scored tokens only: budget >= n_sink + chunk is required (check_budget raises ConfigError otherwise).
    """

    name: ClassVar[str] = "epikv"
    needs_hidden_states: ClassVar[bool] = True
    ring_state_axes: ClassVar[dict[str, int]] = {"history": 0}
    zscore_window: int = 128
    lower_band: tuple[float, float] = (0.25, 0.5)
    upper_band: tuple[float, float] = (0.5, 0.75)

    def __post_init__(self):
        super().__post_init__()
        self.require("zscore_window", self.zscore_window >= 2, ">= 2 (a z-score needs two values)")
        for band in ("lower_band", "upper_band"):
            low, high = getattr(self, band)
            self.require(band, 0.0 <= low < high <= 1.0, "(start, end) fractions of depth with 0 <= start < end <= 1")

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_EXTERNAL, victim_mode=VICTIM_MIN_SCORE)

    def check_budget(self, budget: int, chunk: int) -> None:
        if budget < self.n_sink + chunk:
            raise ConfigError(
                f"epikv keeps a whole prefill chunk until the forward has scored it, so budget ({budget}) must be "
                f">= n_sink + chunk ({self.n_sink} + {chunk}); raise the budget or lower the chunk")

    def bind(self, pool, num_slots: int, max_budget: int) -> None:
        self.history = torch.zeros(num_slots, self.zscore_window, dtype=torch.float64, device=pool.k.device)
        self._written: dict[int, torch.Tensor] = {}

    def reset_ring(self, ring: int) -> None:
        self.history[ring] = 0

    def prefill_scores(self, cand: PrefillCandidates):
        chunk = torch.full((cand.pos.shape[0], cand.chunk_len), float("inf"), device=cand.pos.device)
        scores = torch.cat([cand.ring_score.float(), torch.zeros_like(chunk)], dim=1)
        return scores, torch.cat([cand.ring_score.float(), chunk], dim=1)  # the chunk stays: inf priority

    def after_decode(self, layer, pool, plan, written) -> None:
        self._written[layer] = written

    def end_step(self, pool, plan, hidden_states) -> None:
        raw = hidden_change_scores(hidden_states, self.lower_band, self.upper_band)
        nd = plan.num_decode
        if nd:
            z = self.decode_zscores(plan.decode_slots, plan.decode_pos, raw[:nd])
            self._write_decode(pool, plan.decode_tables, z)
        for seg in plan.prefills:
            z = self.chunk_zscores(seg.slot, seg.first_pos, raw[seg.start: seg.start + seg.length])
            self._write_chunk(pool, seg, z)
        self._written.clear()

    # --- detrending with a per-ring history of raw scores (index pos % zscore_window) -------------
    def chunk_zscores(self, ring: int, first_pos: int, raw: torch.Tensor) -> torch.Tensor:
        """z of a chunk's raw scores [C] at positions first_pos..; records them in the ring's history."""
        window = self.zscore_window
        before = torch.arange(first_pos - window + 1, first_pos, device=raw.device)
        series = torch.cat([self.history[ring, before % window], raw.double()])
        valid = torch.cat([before >= 0, torch.ones_like(raw, dtype=torch.bool)])
        z = causal_zscore(series, valid, window)[window - 1:]
        last = min(len(raw), window)
        written = torch.arange(first_pos + len(raw) - last, first_pos + len(raw), device=raw.device)
        self.history[ring, written % window] = raw[-last:].double()
        return z.float()

    def decode_zscores(self, ring_ids: torch.Tensor, new_pos: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """z of one new token per ring [N]: after its write, a ring's history holds exactly its window."""
        window = self.zscore_window
        rings, pos = ring_ids.long(), new_pos.long()
        self.history[rings, pos % window] = raw.double()
        values = self.history[rings]  # [N, window]
        valid = torch.arange(window, device=raw.device)[None] <= pos[:, None]  # before the window fills
        x = torch.where(valid, values, torch.zeros_like(values))
        count = valid.double().sum(1)
        return _zscore(raw.double(), count, x.sum(1), (x * x).sum(1)).float()

    # --- fixing the provisional scores ---------------------------------------------------------------
    def _write_decode(self, pool, tables, z) -> None:
        layers = sorted(self._written)
        written = torch.stack([self._written[layer] for layer in layers]).long()  # [L, N, H] ring slots
        rows = physical_rows(tables[None].expand(len(layers), -1, -1), written, pool.block_size)  # [L, N, H]
        layer_idx = torch.tensor(layers, device=z.device)[:, None, None]
        heads = torch.arange(written.shape[2], device=z.device)[None, None, :]
        pool.score.view(pool.num_layers, -1, pool.num_kv_heads)[layer_idx, rows, heads] = (
            z[None, :, None].expand_as(written))

    @staticmethod
    def _write_chunk(pool, seg, z) -> None:
        """Every ring slot that holds one of the chunk's tokens (in every layer) takes its z."""
        filled = min(seg.ring_size, seg.first_pos + seg.length)
        rows = physical_rows(seg.table, torch.arange(filled, device=z.device), pool.block_size)
        score = pool.score.view(pool.num_layers, -1, pool.num_kv_heads)
        pos = pool.pos.view(pool.num_layers, -1, pool.num_kv_heads)[:, rows].long()  # [L, filled, H]
        mine = (pos >= seg.first_pos) & (pos < seg.first_pos + len(z))
        chunk_z = z[(pos - seg.first_pos).clamp(0, len(z) - 1)]
        score[:, rows] = torch.where(mine, chunk_z, score[:, rows])


# --- EpiKV-lag: lag-normalised K/V spread ----------------------------------------------------------------


def lag_spread(features: torch.Tensor, lag: int) -> torch.Tensor:
    """Score of each token that has `lag` successors: features [H, T, F] in position order -> [H, T - lag].

    Token i's features are min-max normalised channel by channel with the range of tokens i+1..i+lag; the
    score is the standard deviation of the normalised features across channels.
    """
    num_heads, length, channels = features.shape
    if length <= lag:
        return features.new_zeros(num_heads, 0)
    by_channel = features.float().transpose(1, 2)  # [H, F, T]
    hi = torch.nn.functional.max_pool1d(by_channel, lag, stride=1)[..., 1:]  # window [i+1, i+lag]
    lo = -torch.nn.functional.max_pool1d(-by_channel, lag, stride=1)[..., 1:]
    x = by_channel[..., : length - lag]
    return ((x - lo) / (hi - lo + _EPS)).std(dim=1, unbiased=False)


@dataclass
class EpiKVLag(Policy):
    """EpiKV's lag-normalised KV variant (arXiv 2606.26472): per (layer, KV head), a token's features are its
    K and V (2·head_dim channels), min-max normalised per channel by the range of the next `lag` tokens, and
    the score is their standard deviation across channels (a token that stands out of the coming context in
    a few channels is kept).

    minikv's concrete choices:
    - "The next lag chunk" is a sliding window: token j is scored once token j + lag exists, with the range
      over tokens j+1..j+lag; until then its score is PENDING (above every real score: protected).
    - Prefill scores every token of ring + chunk whose lag is complete from the candidates' K and V
      (`needs_values`); the last `lag` tokens stay pending. Decode scores token t - lag right after the kernel
      wrote token t; to find tokens t-lag..t without scanning the ring, each (layer, ring, head) keeps the slots
      of its last lag + 1 tokens (int32).
    - The pending tokens must always fit beside the sinks with a scored token left to evict, so the lag in
      use is min(lag, budget - n_sink - 1): the paper's 128 from budget 133 up (n_sink 4), shorter below.
    """

    name: ClassVar[str] = "epikv-lag"
    needs_values: ClassVar[bool] = True
    ring_state_axes: ClassVar[dict[str, int]] = {"recent_slots": 1}
    lag: int = 128

    def __post_init__(self):
        super().__post_init__()
        self.require("lag", self.lag >= 1, ">= 1")
        self.lag_in_use = self.lag

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_EXTERNAL, victim_mode=VICTIM_MIN_SCORE)

    def bind(self, pool, num_slots: int, max_budget: int) -> None:
        self.lag_in_use = max(1, min(self.lag, max_budget - self.n_sink - 1))
        self.recent_slots = torch.zeros(pool.num_layers, num_slots, pool.num_kv_heads, self.lag_in_use + 1,
                                        dtype=torch.long, device=pool.k.device)  # index pos % (lag + 1)

    def check_budget(self, budget: int, chunk: int) -> None:
        lag = getattr(self, "lag_in_use", self.lag)  # fixed by bind from the engine's budget
        if budget < min(self.lag, lag) + self.n_sink + 1:
            raise ConfigError(f"epikv-lag keeps its last lag ({lag}) tokens pending beside the {self.n_sink} sinks, "
                              f"so a budget must be >= {lag + self.n_sink + 1} (got {budget}); raise it or lower lag")

    def prefill_scores(self, cand: PrefillCandidates):
        """Ring scores stay; every candidate of the last lag (ring tail) + chunk whose lag is complete is scored."""
        lag = self.lag_in_use
        num_heads, n = cand.pos.shape
        pending = torch.full((num_heads, cand.chunk_len), PENDING, device=cand.pos.device)
        scores = torch.cat([cand.ring_score.float(), pending], dim=1)
        pos = cand.pos.long()
        last = pos[:, -1:]  # the chunk's last position
        first = (last - lag - cand.chunk_len + 1).clamp(min=0)  # the oldest token that may still be pending
        span = lag + cand.chunk_len  # positions first .. last, at most
        order = torch.where(pos >= first, pos - first, torch.full_like(pos, span))  # span = "not ours"
        table = torch.full((num_heads, span + 1), n, dtype=torch.long, device=pos.device)
        table.scatter_(1, order, torch.arange(n, device=pos.device).expand(num_heads, -1))
        table = table[:, :span]  # candidate index of position first + i; n where the position does not exist
        feats = torch.cat([cand.keys, cand.values], dim=-1).float()
        feats = torch.cat([feats, feats.new_zeros(num_heads, 1, feats.shape[-1])], dim=1)  # index n: padding
        heads = torch.arange(num_heads, device=pos.device)[:, None]
        spread = lag_spread(feats[heads, table], lag)  # [H, span - lag]
        length = last - first + 1  # real positions in the table (fewer than span early in a sequence)
        complete = torch.arange(span - lag, device=pos.device)[None] < length - lag
        target = torch.where(complete, table[:, : span - lag], torch.full_like(table[:, : span - lag], n))
        scores = torch.cat([scores, scores.new_zeros(num_heads, 1)], dim=1).scatter_(1, target, spread)[:, :n]
        return scores, scores

    def new_token_scores(self, layer, ring_ids, new_pos, k_new):
        return torch.full(k_new.shape[:2], PENDING, device=k_new.device)

    def after_prefill_chunk(self, layer, pool, segment) -> None:
        """Remember the slots of the chunk's last lag + 1 tokens, for decode."""
        r, keep = segment.slot, self.lag_in_use + 1
        last = segment.first_pos + segment.length - 1
        filled = min(segment.ring_size, last + 1)
        rows = physical_rows(segment.table, torch.arange(filled, device=pool.pos.device), pool.block_size)
        pos = pool.rows("pos")[rows].transpose(0, 1).long()  # [H, filled]
        recent = (pos > last - keep) & (pos >= 0)
        at = torch.where(recent, pos % keep, torch.full_like(pos, keep))  # keep = "not recent"
        slots = torch.arange(filled, device=pos.device).expand_as(pos)
        table = torch.cat([self.recent_slots[layer, r], torch.zeros_like(pos[:, :1])], dim=1)
        self.recent_slots[layer, r] = table.scatter_(1, at, slots)[:, :keep]

    def after_decode(self, layer, pool, plan, written) -> None:
        """Record the new token's slot; score token pos - lag, whose next lag is now complete."""
        lag = self.lag_in_use
        rings, pos = plan.decode_slots.long(), plan.decode_pos.long()
        recent = self.recent_slots[layer, rings]  # [N, H, lag + 1]
        at = (pos % (lag + 1))[:, None, None].expand(-1, recent.shape[1], 1)
        recent.scatter_(2, at, written.long()[:, :, None])
        self.recent_slots[layer, rings] = recent
        order = (pos[:, None] - lag + torch.arange(lag + 1, device=pos.device)) % (lag + 1)  # oldest first
        table = recent.gather(2, order[:, None, :].expand(-1, recent.shape[1], -1))  # [N, H, lag + 1] ring slots
        n, h = table.shape[:2]
        rows = physical_rows(plan.decode_tables, table.reshape(n, -1), pool.block_size).view(n, h, lag + 1)
        heads = torch.arange(h, device=pos.device)[None, :, None]
        feats = torch.cat([pool.rows("k")[rows, heads].float(), pool.rows("v")[rows, heads].float()], dim=-1)
        scores = lag_spread(feats.reshape(n * h, lag + 1, -1), lag).reshape(n, h)
        slot_rows, head_idx = rows[:, :, 0], heads[:, :, 0]
        current = pool.rows("score")[slot_rows, head_idx]
        pool.rows("score")[slot_rows, head_idx] = torch.where((pos >= lag)[:, None], scores, current)
