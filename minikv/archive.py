"""Forget without losing: a per-request KV archive in host memory, and recall by query (docs/design.md, "Archive").

A ring forgets for ever: what it evicts is what a question arriving later may need. With an archive, every
token's K/V also goes to host memory (write-through: each step's k / v activations, before RoPE, are appended
when the step ends), so the tokens a ring has evicted are exactly "archive minus ring" in each (layer, KV head),
without the decode kernel or the keep step reporting their victims.

Recall (RecallRule) is a vote, then a take-back a step later. At the prompt's last chunk (where a question
ends) and every `recall_interval` decode steps, each layer's recent queries (the chunk's last rows, or the
decode queries since the last recall) score the archive: a (layer, KV head) votes for an archived token its
ring lacks when some query would give it at least a `threshold` share of its attention (`demand`; blocks
ranked first by an upper bound of q.k from per-channel key min/max, as Quest and ArkVale do). A token with
`min_votes` votes over all layers and heads is needed, with its `span` neighbours (`needed`): a fact is a run
of tokens, and the heads that find it are not all the heads that read it. At the request's next step every
ring that lacks a needed token takes it back over the slot its policy would evict next (`take_back`), keeping
its text position. The slots it replaces stay in the archive (write-through), so nothing is lost while the
archive holds it.

Bounds: a request's archive holds its last `archive_budget` tokens (SamplingParams; 0 = off); all archives
together hold at most `archive_memory` bytes (Engine), the largest archive losing its oldest tokens first.
Bytes per token: `bytes_per_token` (K and V in the pool's dtype for every layer and KV head, the position,
and the blocks' fp32 key min/max spread over BLOCK tokens). The block bounds and the swap have Triton
kernels beside their torch references (kernels/archive_score.py, kernels/archive_swap.py).

Under positions="ring" a recalled token keeps its text position (`pos`) and takes its rank among the ring's
tokens by that position: after a swap the ring's slots are ranked again (one sort per layer and KV head), so
the decode kernel's shift-down bookkeeping finds ranks 0..f-1 in position order as it expects. Recall's
scoring itself is in text positions in both modes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .kernels.common import VICTIM_OLDEST, PoolLayer, Rope, physical_rows

BLOCK = 32  # archive tokens per summary block
RECALL_ROWS = 16  # a prefill chunk recalls with its last rows' queries (where a question ends)


@dataclass(frozen=True)
class RecallRule:
    """When an archived token is needed, and what comes back with it (docs/design.md, "Archive").

    A (layer, KV head) *votes* for an archived token its ring lacks when some query since the last recall
    would give it at least `threshold` of its attention (softmax over the ring and the archive together);
    a token with at least `min_votes` votes, summed over every layer and KV head, is needed, and it comes
    back to every ring that lacks it with its `span` neighbours on both sides."""

    threshold: float = 0.1
    min_votes: int = 4
    span: int = 12

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RecallRule.threshold must be a share of attention in [0, 1], got {self.threshold!r}")
        if isinstance(self.min_votes, bool) or not isinstance(self.min_votes, int) or self.min_votes < 1:
            raise ValueError(f"RecallRule.min_votes must be an integer >= 1, got {self.min_votes!r}")
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 0:
            raise ValueError(f"RecallRule.span must be an integer >= 0, got {self.span!r}")


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Host bytes one archived token costs: K and V, its position, and its share of its block's summaries."""
    element = torch.empty((), dtype=dtype).element_size()
    per_head = num_layers * num_kv_heads * head_dim
    return 2 * per_head * element + 4 + -(-2 * per_head * 4 // BLOCK)


class _Block:
    """BLOCK tokens of one request: K and V of every layer and KV head (unrotated), positions, and per layer and
    KV head the channel-wise min / max of the keys rotated to their positions (the scoring summaries)."""

    TENSORS = ("k", "v", "pos", "kmin", "kmax")

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, pin: bool):
        layers, heads, dim = shape
        self.k = torch.empty(layers, heads, BLOCK, dim, dtype=dtype, pin_memory=pin)
        self.v = torch.empty(self.k.shape, dtype=dtype, pin_memory=pin)
        self.pos = torch.empty(BLOCK, dtype=torch.int32)
        self.kmin = torch.full((layers, heads, dim), float("inf"))
        self.kmax = torch.full((layers, heads, dim), float("-inf"))
        self.start = 0  # tokens before it have aged out (the summaries still cover them: a looser bound)
        self.end = 0


class Archive:
    """One request's archive: blocks of BLOCK tokens, oldest first, at most `budget` live tokens."""

    def __init__(self, store: ArchiveStore, budget: int, archive_id: int):
        self.store, self.budget, self.id = store, budget, archive_id
        self.blocks: list[_Block] = []
        self.size = 0  # live tokens
        self.recalled = 0  # ring slots overwritten by recall, summed over layers and KV heads
        self.decode_steps = 0
        self.closed = False
        self.parked = False  # kept by a session's parked ring (minikv.session): its request's end does not free it
        self.queries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer: decode (q, pos) since the last recall
        self.votes: torch.Tensor | None = None  # [size]: (layer, KV head) pairs that demanded each archived token
        self.pending: torch.Tensor | None = None  # positions every ring takes back at the next step
        self.taking: torch.Tensor | None = None  # the pending positions, while the step that takes them runs

    def append(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_rot: torch.Tensor) -> None:
        """pos [T], k / v / k_rot [L, Hkv, T, D] on the host: T new tokens, in position order."""
        done, total = 0, pos.shape[0]
        while done < total:
            if not self.blocks or self.blocks[-1].end == BLOCK:
                self.blocks.append(_Block(self.store.shape, self.store.dtype, self.store.pin))
            block = self.blocks[-1]
            n = min(BLOCK - block.end, total - done)
            span, src = slice(block.end, block.end + n), slice(done, done + n)
            block.k[:, :, span] = k[:, :, src]
            block.v[:, :, span] = v[:, :, src]
            block.pos[span] = pos[src]
            torch.minimum(block.kmin, k_rot[:, :, src].amin(2), out=block.kmin)
            torch.maximum(block.kmax, k_rot[:, :, src].amax(2), out=block.kmax)
            block.end += n
            done += n
        self.size += total
        self.store.tokens += total
        self.drop_oldest(self.size - self.budget)

    def park(self) -> None:
        """Kept by a session between requests: a recall in flight ends with the request that made it, so a
        continued session and one restored from its file go on alike."""
        self.parked = True
        self.queries, self.votes, self.pending, self.taking = {}, None, None, None

    def drop_oldest(self, count: int) -> None:
        while count > 0 and self.blocks:
            block = self.blocks[0]
            n = min(count, block.end - block.start)
            block.start += n
            self.size -= n
            self.store.tokens -= n
            count -= n
            if block.start == block.end and (len(self.blocks) > 1 or block.end == BLOCK):
                self.blocks.pop(0)

    def truncate(self, end: int) -> None:
        """Drop the newest tokens, those at positions >= end (a session continuing from an earlier point).
        The summaries still cover them: a looser bound, never a wrong one."""
        self.store.record(("truncate", self.id, end))
        while self.blocks:
            block = self.blocks[-1]
            keep = int((block.pos[block.start: block.end] < end).sum())
            n = block.end - block.start - keep
            block.end -= n
            self.size -= n
            self.store.tokens -= n
            if keep:
                return
            self.blocks.pop()

    def set_budget(self, budget: int) -> None:
        """Hold at most `budget` tokens from now on (its oldest go)."""
        self.store.record(("budget", self.id, budget))
        self.budget = budget
        self.drop_oldest(self.size - budget)

    def close(self) -> None:
        """Free every block (at finish or abort)."""
        if not self.closed:
            self.store.record(("close", self.id))
            self.drop_oldest(self.size)
            self.blocks.clear()
            self.closed = True
            self.store.archives.discard(self)
            self.store.by_id.pop(self.id, None)

    @property
    def first(self) -> int:
        """The oldest live token's position (the live tokens are consecutive positions: write-through)."""
        block = self.blocks[0]
        return int(block.pos[block.start])

    def tokens_at(self, layer: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [Hkv, n, D] of one layer's live tokens at positions `pos` [n]: the live tokens are
        consecutive positions, so only the blocks that cover pos's range are read."""
        index = pos.cpu().long() - self.first
        lo, hi = int(index.min()), int(index.max())
        parts, at = [], 0
        for b in self.blocks:
            n = b.end - b.start
            if at + n > lo and at <= hi:
                parts.append((at, b))
            at += n
        base = parts[0][0]
        k = torch.cat([b.k[layer, :, b.start: b.end] for _, b in parts], dim=1)
        v = torch.cat([b.v[layer, :, b.start: b.end] for _, b in parts], dim=1)
        return k[:, index - base], v[:, index - base]

    def positions(self) -> torch.Tensor:
        """The live tokens' positions, oldest first (tests and tools)."""
        parts = [b.pos[b.start: b.end] for b in self.blocks]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a session file keeps of it (ArchiveStore.restore makes it again, bitwise): the blocks' tensors
        stacked ([blocks, ...], under "archive.*") and the counters and each block's live span as JSON."""
        meta = dict(budget=self.budget, decode_steps=self.decode_steps, spans=[[b.start, b.end] for b in self.blocks])
        if not self.blocks:
            return meta, {}
        tensors = {f"archive.{name}": torch.stack([getattr(b, name) for b in self.blocks]).contiguous()
                   for name in _Block.TENSORS}
        return meta, tensors


@dataclass
class _Pending:
    archive: Archive
    pos: torch.Tensor  # [T] int32, on the step's device
    rows: slice | torch.Tensor  # the flat batch's rows of these tokens
    k: list[torch.Tensor] = field(default_factory=list)  # per layer [T, Hkv, D]
    v: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ArchiveMessage:
    """The other ranks' share of a step's archive work under tensor parallelism (StepPlan.archive): the
    archive operations rank 0 made since the last step, in order ("open", id, budget), ("close", id),
    ("truncate", id, end), ("budget", id, budget), and the step's ArchiveStep by archive id."""

    ops: list[tuple] = field(default_factory=list)
    decodes: list[tuple[int, int, bool]] = field(default_factory=list)  # (decode row, archive id, recall now)
    prefills: list[tuple[int, int]] = field(default_factory=list)  # (index in plan.prefills, archive id)


@dataclass
class ArchiveStep:
    """What one step does with archives, made by the model runner: which rows append, which recall."""

    decodes: list[tuple[int, Archive, bool]] = field(default_factory=list)  # (decode row, archive, recall now)
    prefills: list[tuple[int, Archive]] = field(default_factory=list)  # (index in plan.prefills, archive)


class ArchiveStore:
    """Every request's archive, the engine's memory bound, and the hooks the attention call point runs.

    Under tensor parallelism every rank has one, of its own KV heads, and each recalls into its own heads'
    rings (recall decides per KV head, so no rank needs another's keys). Rank 0 decides everything else and
    records it (`log`); the step's message carries the record (ArchiveMessage) and the other ranks replay it
    (`begin_remote`), so every rank's archives hold the same tokens. The recall counts are summed over the
    ranks by one all-reduce on the steps that recall (`tp`)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 memory: int, recall_interval: int, recall_blocks: int | None = None, pin: bool = False,
                 rule: RecallRule = RecallRule()):
        self.shape, self.dtype, self.pin = (num_layers, num_kv_heads, head_dim), dtype, pin
        self.rule = rule
        self.bytes_per_token = bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        self.memory, self.recall_interval, self.recall_blocks = memory, recall_interval, recall_blocks
        self.archives: set[Archive] = set()
        self.by_id: dict[int, Archive] = {}
        self._ids = itertools.count()
        self.log: list[tuple] | None = None  # rank 0 under tensor parallelism: the operations to replay
        self.tp = None  # minikv.distributed.TPGroup under tensor parallelism: recall counts are summed over it
        self._step_counts: dict[int, int] = {}  # archive id -> slots its recall overwrote this step (under tp)
        self._plan = None  # the step's StepPlan
        self.tokens = 0  # live tokens over every archive
        self.recalled_total = 0  # for /metrics
        self.step: ArchiveStep | None = None
        self._pending: list[_Pending] = []
        # a list to record every swap in: (layer, KV heads [n], positions recalled [n]) on the host, for tools
        # that mark recalled tokens (tools/kv_heatmap.py); None: nothing is recorded
        self.trace: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None

    @property
    def bytes_used(self) -> int:
        return self.tokens * self.bytes_per_token

    def open(self, budget: int, archive_id: int | None = None) -> Archive:
        archive = Archive(self, budget, next(self._ids) if archive_id is None else archive_id)
        self.record(("open", archive.id, budget))
        self.archives.add(archive)
        self.by_id[archive.id] = archive
        return archive

    def record(self, op: tuple) -> None:
        if self.log is not None:
            self.log.append(op)

    def message(self, step: ArchiveStep | None) -> ArchiveMessage | None:
        """Rank 0: the step's message for the other ranks (None: nothing happened to any archive)."""
        if not self.log and step is None:
            return None
        ops, self.log = self.log, []
        if step is None:
            return ArchiveMessage(ops)
        return ArchiveMessage(ops, [(row, a.id, due) for row, a, due in step.decodes],
                              [(i, a.id) for i, a in step.prefills])

    def begin_remote(self, plan) -> None:
        """Another rank: replay rank 0's operations and begin the step it describes (plan.archive)."""
        message = plan.archive
        if message is None:
            self.begin_step(None, plan)
            return
        for op in message.ops:
            if op[0] == "open":
                self.open(op[2], archive_id=op[1])
            elif op[0] == "close":
                self.by_id[op[1]].close()
            elif op[0] == "truncate":
                self.by_id[op[1]].truncate(op[2])
            elif op[0] == "budget":
                self.by_id[op[1]].set_budget(op[2])
            else:
                raise ValueError(f"unknown archive operation {op!r}")
        step = ArchiveStep([(row, self.by_id[i], due) for row, i, due in message.decodes],
                           [(s, self.by_id[i]) for s, i in message.prefills])
        self.begin_step(step if step.decodes or step.prefills else None, plan)

    def check(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError, saying what, unless Archive.state's `meta` and `tensors` fit this store."""
        spans = meta.get("spans")
        def valid(span) -> bool:
            return (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                    and 0 <= span[0] <= span[1] <= BLOCK)

        if not isinstance(spans, list) or not all(valid(span) for span in spans):
            raise ValueError("its archive's block spans are invalid")
        budget, steps = meta.get("budget"), meta.get("decode_steps")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (budget, steps)) or not budget:
            raise ValueError("its archive's budget or decode step count is invalid")
        like = _Block(self.shape, self.dtype, False)
        for name in _Block.TENSORS:
            t, want = tensors.get(f"archive.{name}"), getattr(like, name)
            if spans and (t is None or t.dtype != want.dtype or t.shape != (len(spans), *want.shape)):
                raise ValueError(f"its archive tensor {name!r} is missing or is not this engine's shape and dtype")

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> Archive:
        """An archive from Archive.state (a session file), checked first (`check`); the memory bound then
        holds as after a step."""
        self.check(meta, tensors)
        spans = meta["spans"]
        archive = self.open(meta["budget"])
        archive.decode_steps = meta["decode_steps"]
        for i, (start, end) in enumerate(spans):
            block = _Block(self.shape, self.dtype, self.pin)
            for name in _Block.TENSORS:
                getattr(block, name).copy_(tensors[f"archive.{name}"][i])
            block.start, block.end = start, end
            archive.blocks.append(block)
            archive.size += end - start
        self.tokens += archive.size
        archive.drop_oldest(archive.size - archive.budget)
        self.hold_memory()
        return archive

    # --- hooks -------------------------------------------------------------------------------------
    def begin_step(self, step: ArchiveStep | None, plan) -> None:
        self.step, self._pending, self._plan, self._step_counts = step, [], plan, {}
        for archive in self._archives_of(step):
            archive.taking, archive.pending = archive.pending, None
        if step is None:
            return
        for row, archive, _ in step.decodes:
            self._pending.append(_Pending(archive, plan.decode_pos[row: row + 1], slice(row, row + 1)))
        for i, archive in step.prefills:
            seg = plan.prefills[i]
            pos = torch.arange(seg.first_pos, seg.first_pos + seg.length, dtype=torch.int32, device=plan_device(plan))
            self._pending.append(_Pending(archive, pos, slice(seg.start, seg.start + seg.length)))

    def on_layer(self, layer: int, q, k, v, plan, attention) -> None:
        """Before layer `layer` attends: take back into each full ring what the last recall found needed, and
        where a recall is due, let this layer's queries vote on the archived tokens (the votes of every layer
        decide at end_step, and the rings take the needed tokens back at the request's next step); then stage
        the step's tokens (their K/V reach the archive at end_step, so a recall never sees its own step's)."""
        step = self.step
        if step is None:
            return
        pool, spec, policy = attention.pool.layer(layer), attention.spec, attention.policy
        take = dict(n_sink=policy.n_sink, window=policy.window, hold=spec.hold,
                    oldest_first=spec.victim_mode == VICTIM_OLDEST, trace=self.trace)
        score = dict(rope=attention._rope, scale=attention.scale, threshold=self.rule.threshold,
                     recall_blocks=self.recall_blocks)
        for row, archive, due in step.decodes:
            table, pos = plan.decode_tables[row], plan.decode_pos[row: row + 1]
            filled = int(plan.decode_filled[row])
            full = filled == int(plan.decode_budget[row])
            ranked = plan.decode_ring is not None and bool(plan.decode_ring[row])
            if archive.taking is not None and full:
                self._count(archive, take_back(archive, layer, archive.taking, int(pos), pool, table, filled,
                                               ring_positions=ranked, **take))
            queries = archive.queries.setdefault(layer, [])
            queries.append((q[row: row + 1], pos))
            if due:
                if full:
                    rows, at = (torch.cat(x) for x in zip(*queries))
                    self._vote(archive, demand(archive, layer, rows, at, pool, table, filled, **score))
                queries.clear()
        for i, archive in step.prefills:
            seg = plan.prefills[i]
            if not (seg.filled == seg.ring_size and seg.filled):
                continue
            if archive.taking is not None:
                self._count(archive, take_back(archive, layer, archive.taking, seg.first_pos, pool, seg.table,
                                               seg.filled, ring_positions=seg.ring_positions, **take))
            if seg.ends_prompt:
                rows = min(RECALL_ROWS, seg.length)
                start = seg.start + seg.length - rows
                at = torch.arange(seg.first_pos + seg.length - rows, seg.first_pos + seg.length,
                                  dtype=torch.int32, device=q.device)
                self._vote(archive, demand(archive, layer, q[start: start + rows], at, pool, seg.table, seg.filled,
                                           **score))
        for p in self._pending:
            p.k.append(k[p.rows])
            p.v.append(v[p.rows])

    def _vote(self, archive: Archive, wanted: torch.Tensor) -> None:
        if archive.votes is None:
            archive.votes = torch.zeros(archive.size, dtype=torch.int32)
        if wanted.numel():
            archive.votes += torch.bincount(wanted.long() - archive.first, minlength=archive.size)

    def _count(self, archive: Archive, swapped: int) -> None:
        if self.tp is not None:  # summed over the ranks at the step's end
            self._step_counts[archive.id] = self._step_counts.get(archive.id, 0) + swapped
            return
        archive.recalled += swapped
        self.recalled_total += swapped

    def _sum_over_ranks(self, step: ArchiveStep, device) -> None:
        """Under tensor parallelism: add every rank's recall counts and votes of the step (one all-reduce;
        every rank runs the same plan, so the same archives count and vote, with votes of the same length)."""
        archives = list(dict.fromkeys([a for _, a, _ in step.decodes] + [a for _, a in step.prefills]))
        voting = [a for a in archives if a.votes is not None]
        counts = torch.tensor([self._step_counts.get(a.id, 0) for a in archives], dtype=torch.int64)
        total = self.tp.all_reduce(torch.cat([counts] + [a.votes.long() for a in voting]).to(device)).cpu()
        for archive, n in zip(archives, total[: len(archives)].tolist()):
            archive.recalled += n
            self.recalled_total += n
        at = len(archives)
        for archive in voting:
            archive.votes = total[at: at + archive.size].to(torch.int32)
            at += archive.size

    def end_step(self, rope: Rope | None) -> None:
        """Append the step's staged tokens to their archives (one host copy each), decide what the step's votes
        take back, then hold the memory bound."""
        step = self.step
        if self.tp is not None and any(a.votes is not None or a.taking is not None for a in self._archives_of(step)):
            self._sum_over_ranks(step, plan_device(self._plan))
        for archive in self._archives_of(step):
            votes, archive.votes, archive.taking = archive.votes, None, None
            if votes is not None and votes.numel():  # before the append: votes index the archive as it was
                archive.pending = needed(votes, archive.first, self.rule.min_votes, self.rule.span)
        for p in self._pending:
            if p.archive.closed or len(p.k) != self.shape[0]:
                continue
            k = torch.stack(p.k).transpose(1, 2)  # [L, Hkv, T, D]
            v = torch.stack(p.v).transpose(1, 2)
            k_rot = rotated(k, p.pos, rope)
            p.archive.append(p.pos.cpu(), k.to("cpu", self.dtype), v.to("cpu", self.dtype), k_rot.cpu())
        for _, archive, due in (step.decodes if step else ()):
            archive.decode_steps += 1
        self._pending, self.step, self._plan = [], None, None
        self.hold_memory()

    @staticmethod
    def _archives_of(step: ArchiveStep | None) -> list[Archive]:
        if step is None:
            return []
        return list(dict.fromkeys([a for _, a, _ in step.decodes] + [a for _, a in step.prefills]))

    def hold_memory(self) -> None:
        """All archives within `memory` bytes: the largest loses its oldest tokens first (parked ones too)."""
        while self.memory is not None and self.bytes_used > self.memory and self.archives:
            largest = max(self.archives, key=lambda a: (a.size, -a.id))  # ties: the oldest, on every rank
            largest.drop_oldest(min(BLOCK, largest.size))


def archive_step_of(sched, plan, store: ArchiveStore | None) -> ArchiveStep | None:
    """The step's archive work (None: no request of the step keeps an archive), handed to the store."""
    if store is None:
        return None
    step = ArchiveStep()
    for row, req in enumerate(sched.decodes):
        archive = getattr(req, "archive", None)
        if archive is not None:
            # the first decode step recalls too: the answer's first query is the one a prompt's question leads to
            step.decodes.append((row, archive, archive.decode_steps % store.recall_interval == 0))
    for i, chunk in enumerate(sched.prefills):
        archive = getattr(chunk.req, "archive", None)
        if archive is not None:
            step.prefills.append((i, archive))
    step = step if step.decodes or step.prefills else None
    if store.log is not None:  # tensor parallelism: the other ranks replay it from the step's message
        plan.archive = store.message(step)
    store.begin_step(step, plan)
    return step


def plan_device(plan) -> torch.device:
    return plan.decode_pos.device if plan.decode_pos is not None else plan.prefills[0].table.device


def rotated(k: torch.Tensor, pos: torch.Tensor, rope: Rope | None) -> torch.Tensor:
    """k [..., T, D] rotated to positions pos [T] (fp32); as it is without RoPE."""
    if rope is None:
        return k.float()
    return rope.rotate(k, pos.to(k.device).expand(k.shape[:-1]))


def demand(archive: Archive, layer: int, q: torch.Tensor, q_pos: torch.Tensor, pool: PoolLayer, table: torch.Tensor,
           filled: int, rope: Rope | None, scale: float, threshold: float,
           recall_blocks: int | None = None) -> torch.Tensor:
    """The archived tokens this layer's queries q [R, Hq, D] (unrotated, at q_pos [R]) demand: per KV head,
    those not in its ring that would take at least `threshold` of some query's attention were they in it
    (softmax over the ring and the head's archived tokens together). Returns their positions, one entry per
    (KV head, token): a token demanded by three heads appears three times.

    Blocks are ranked by the Quest bound (sum over channels of max(q * kmin, q * kmax)); the `recall_blocks`
    best per head (None: all) are scored exactly. Scoring is in text positions whatever the request's mode:
    queries at q_pos, ring and archive keys at their tokens' positions, so both are ranked on one scale."""
    blocks = [b for b in archive.blocks if b.end > b.start]
    if not blocks:
        return torch.empty(0, dtype=torch.int32)
    device = pool.k.device
    num_kv_heads, dim = pool.k.shape[-2], pool.k.shape[-1]
    qr = q.float() if rope is None else rope.rotate(q, q_pos[:, None].expand(q.shape[:2]))
    qh = qr.view(qr.shape[0], num_kv_heads, -1, dim).transpose(0, 1).reshape(num_kv_heads, -1, dim)  # [H, R*G, D]
    rows = physical_rows(table, torch.arange(filled, device=device), pool.block_size)
    ring_pos = pool.rows("pos")[rows]  # [f, H]
    ring_k = rotated(pool.rows("k")[rows].transpose(0, 1), ring_pos.transpose(0, 1), rope)
    ring_logit = torch.einsum("hqd,hfd->hqf", qh, ring_k) * scale  # [H, R*G, f]
    kmin = torch.stack([b.kmin[layer] for b in blocks]).to(device)  # [B, H, D]
    kmax = torch.stack([b.kmax[layer] for b in blocks]).to(device)
    bound = block_bounds(qh, kmin.transpose(0, 1), kmax.transpose(0, 1))  # [H, B]
    take = bound.shape[1] if recall_blocks is None else min(recall_blocks, bound.shape[1])
    best = bound.topk(take, dim=1).indices.tolist()
    wanted = []
    for h in range(num_kv_heads):
        chosen = [blocks[i] for i in sorted(best[h])]
        pos = torch.cat([b.pos[b.start: b.end] for b in chosen]).to(device)
        keys = torch.cat([b.k[layer, h, b.start: b.end] for b in chosen]).to(device)
        fresh = ~torch.isin(pos, ring_pos[:, h])  # archive minus ring: what this head's ring evicted
        if not bool(fresh.any()):
            continue
        pos, keys = pos[fresh], keys[fresh]
        logit = qh[h] @ rotated(keys, pos, rope).T * scale  # [R*G, A]
        norm = torch.logsumexp(torch.cat([ring_logit[h], logit], dim=1), dim=1, keepdim=True)
        share = (logit - norm).exp().amax(0)  # [A]: the largest share of one query's attention
        wanted.append(pos[share >= threshold])
    return torch.cat(wanted).to("cpu", torch.int32) if wanted else torch.empty(0, dtype=torch.int32)


def needed(votes: torch.Tensor, first: int, min_votes: int, span: int) -> torch.Tensor | None:
    """Positions to take back from per-token votes [A] (positions first..first+A-1): those with at least
    `min_votes`, each with its `span` neighbours on both sides, since a fact is a run of tokens and the
    heads that find it (matching a question's words) are not all the heads that read it (copying its digits)."""
    hit = votes >= min_votes
    if not bool(hit.any()):
        return None
    near = torch.nn.functional.max_pool1d(hit[None, None].float(), 2 * span + 1, stride=1, padding=span)[0, 0] > 0
    return near.nonzero().squeeze(1).to(torch.int32) + first


def take_back(archive: Archive, layer: int, wanted: torch.Tensor, q_pos: int, pool: PoolLayer, table: torch.Tensor,
              filled: int, n_sink: int, window: int, hold: bool, oldest_first: bool, *,
              ring_positions: bool = False, trace: list | None = None) -> int:
    """Swap the archived tokens at positions `wanted` into one full ring (one layer), every KV head, where a
    head's ring lacks them; return the slots overwritten.

    The slots that make room are the ones the policy would evict next (the lowest scores, or the oldest
    positions for `oldest_first` policies), among the unprotected: not sinks (pos < n_sink), not in the window
    (the `window` positions before q_pos), not held (under hold). A recalled token gets the ring's best score,
    so the policy does not evict it at once; it keeps its text position, and under positions="ring"
    (`ring_positions`) the ring's slots are ranked again by text position. `trace`: a list that gets (layer,
    KV heads, positions) of the swap, on the host."""
    if archive.size == 0:
        return 0
    device = pool.k.device
    live = wanted[(wanted >= archive.first) & (wanted < archive.first + archive.size)].to(device)
    if live.numel() == 0:
        return 0
    rows = physical_rows(table, torch.arange(filled, device=device), pool.block_size)
    ring_pos, score = pool.rows("pos")[rows], pool.rows("score")[rows]  # [f, H]
    protected = (ring_pos < n_sink) | (ring_pos >= q_pos - window)
    if hold:
        protected |= pool.rows("held")[rows] != 0
    k_live, v_live = archive.tokens_at(layer, live)  # [H, m, D]
    swaps = []
    for h in range(pool.k.shape[-2]):
        lacking = (~torch.isin(live, ring_pos[:, h])).nonzero().squeeze(1)
        open_slots = (~protected[:, h]).nonzero().squeeze(1)
        n = min(lacking.numel(), open_slots.numel())
        if n == 0:
            continue
        lacking = lacking[:n]
        victim_key = ring_pos[open_slots, h].float() if oldest_first else score[open_slots, h]
        out_slots = open_slots[victim_key.argsort(stable=True)[:n]]
        host = lacking.cpu()  # the archive lives in host memory
        swaps.append((rows[out_slots], torch.full((n,), h, dtype=torch.int32, device=device),
                      k_live[h, host].to(device), v_live[h, host].to(device), live[lacking],
                      score[:, h].max().expand(n)))
    if not swaps:
        return 0
    out_rows, heads, keys, values, pos, best = (torch.cat(parts) for parts in zip(*swaps))
    swap(pool, out_rows, heads, keys, values, pos, best)
    if ring_positions:
        rerank(pool, rows)
    if trace is not None:
        trace.append((layer, heads.cpu(), pos.cpu()))
    return out_rows.numel()


def rerank(pool: PoolLayer, rows: torch.Tensor) -> None:
    """Ranks (positions="ring") of the ring slots at pool rows `rows` [f] in ring order, from their text
    positions: rope_pos = the slot's rank by position in its (layer, KV head), 0..f-1."""
    pool.rows("rope_pos")[rows] = pool.rows("pos")[rows].argsort(0).argsort(0).to(torch.int32)


def block_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The Quest bound of every block (kernels.archive_score): Triton where the kernels run Triton."""
    from . import kernels

    if kernels.kernel_backend(q.device) == "triton":
        from .kernels.archive_score import block_bound_triton

        return block_bound_triton(q, kmin, kmax)
    return torch.maximum(q[:, None] * kmin[:, :, None], q[:, None] * kmax[:, :, None]).sum(-1).amax(-1)


def swap(pool: PoolLayer, rows, heads, k, v, pos, score) -> None:
    """Recalled tokens into ring rows (kernels.archive_swap): Triton where the kernels run Triton."""
    from . import kernels
    from .kernels.archive_swap import swap_reference, swap_triton

    if kernels.kernel_backend(pool.k.device) == "triton":
        swap_triton(pool, rows, heads, k, v, pos, score)
    else:
        swap_reference(pool, rows, heads, k, v, pos, score)


def make_archive_store(pool, *, memory: int, recall_interval: int, rule: RecallRule = RecallRule(),
                       workers=None) -> ArchiveStore:
    """Rank 0's store for a KV pool (of its own KV heads) and, under tensor parallelism (`workers`), one on
    every other rank, set up to replay rank 0's record (`memory` is then each rank's bound)."""
    settings = dict(num_layers=pool.num_layers, num_kv_heads=pool.num_kv_heads, head_dim=pool.head_dim,
                    dtype=pool.k.dtype, memory=memory, recall_interval=recall_interval, rule=rule)
    store = ArchiveStore(**settings, pin=pool.k.device.type == "cuda")
    if workers is not None:
        store.log, store.tp = [], workers.tp
        workers.call(_attach_worker_store, (settings,), None)
    return store


def _attach_worker_store(state, settings: dict) -> None:
    """On another rank (Workers.call): its store, for its own KV heads and pool, summing counts over the group."""
    from .distributed.group import TPGroup

    store = ArchiveStore(**settings, pin=state.pool.k.device.type == "cuda")
    store.tp = next(m.tp for m in state.model.modules() if isinstance(getattr(m, "tp", None), TPGroup))
    state.attention.archive = store
