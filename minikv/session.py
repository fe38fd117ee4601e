"""Sessions: a conversation (or an agent) keeps its ring between requests, so its turns are one stream.

A request given a `session_id` leaves its ring to that session when it finishes: the ring's blocks stay in
the one KV pool, *parked* under an owner id of their own, with everything that belongs to the ring (K/V,
positions, scores, held marks and edges live in its blocks; the policy's per-ring state is copied out of
the batch slot) and the token ids the session has seen. The session's next request sends the whole
conversation (or `append=True`: only its new tokens); the longest prefix of it the ring has already read
is not computed again: the parked ring moves into the new request's batch slot and prefill starts at the
first new token, at the position after the last one the ring read. Eviction carries on as one stream. A
request's KV archive (minikv.archive) parks with its ring and goes where the ring goes (taken over, saved,
restored, released).

    turn 1   prompt 0..99, generates 100..119            ring reads 0..118 (119 was sampled, never fed)
    park     blocks stay in the pool, owner = the session; policy state copied; ids 0..119 kept
    turn 2   prompt = ids 0..119 + new 120..159          prefix 0..118 reused, prefill 119..159 only

Parked rings never delay other work: when admission is short of blocks, parked rings are released least
recently used first (that session keeps its token ids, and its next turn prefills them again: slower,
never wrong). Limits: at most `max_parked` parked rings and `max_parked_blocks` blocks between them; at
most `max_sessions` sessions kept at all (the least recently used idle one is forgotten beyond that).

A prompt that diverges from what the ring read (a re-rendered history whose last turn tokenizes another
way, a reply regenerated) is rolled back to the common prefix. While the ring has evicted nothing its slots
hold positions 0..n-1 in order, so the tail is simply overwritten (under `full` this is exact). Once it has
evicted, a divergence within the last `window` tokens it read (the policy's protected recent window: those
tokens are in every layer and KV head) is rolled back by removing their slots (`roll_back_ring`): the
ring's last slots move into the holes and the ring holds fewer slots than its budget until new tokens
fill them. Either way the kept slots' scores still count the attention the rolled-back tokens paid them, and
tokens evicted while the tail was in the ring stay evicted: an approximation of the ring that never read
the tail (docs/design.md, section 10). A divergence further back, under a policy with per-ring running
state (epikv, nestedkv: that state cannot be rolled back) or under tensor parallelism (other ranks hold the
other KV heads), prefills the conversation from the start.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, InvalidRequestError, SessionFileError

# Pool owner ids of parked rings: far above any batch slot, so the allocator tells them apart.
PARKED_OWNER_BASE = 1 << 30
# Version 2: the ring's keys hold each head's channels in RoPE's paired order (loader.to_paired_order);
# a version-1 file's keys are in Hugging Face's order and would be misread, so it is refused.
FILE_FORMAT, FILE_VERSION = "minikv-session", 2


def _ring_rows(pool, blocks: list[int], length: int) -> torch.Tensor:
    """Pool rows (block * block_size + offset) of ring slots 0..length-1."""
    table = torch.tensor(blocks, dtype=torch.long, device=pool.k.device)
    return (table[:, None] * pool.block_size + torch.arange(pool.block_size, device=table.device)).flatten()[:length]


def read_ring(pool, name: str, blocks: list[int], length: int) -> torch.Tensor:
    """Slots 0..length-1 of a ring, in ring order, of the pool tensor `name`: [layers, length, ...]."""
    t = getattr(pool, name)
    return t.view(t.shape[0], -1, *t.shape[3:])[:, _ring_rows(pool, blocks, length)]


def write_ring(pool, name: str, blocks: list[int], values: torch.Tensor) -> None:
    """The inverse of read_ring."""
    t = getattr(pool, name)
    t.view(t.shape[0], -1, *t.shape[3:])[:, _ring_rows(pool, blocks, values.shape[1])] = values.to(t.device, t.dtype)


def roll_back_ring(pool, blocks: list[int], filled: int, read: int, to: int) -> int | None:
    """Remove from a ring of `filled` slots that has read positions 0..read-1 the slots of positions
    to..read-1, in every layer and KV head, and return the slots left (filled - (read - to)); None, with
    nothing changed, unless every (layer, KV head) holds all of those positions.

    Per (layer, KV head) the holes sit at different slots: the ring's last kept slots move into the holes
    below the new fill (every per-slot tensor of the pool moves alike) and out-edges are renumbered (an edge to
    a removed slot is dropped), so slots 0..left-1 are a valid ring. The removed positions are the ring's
    largest, so under positions="ring" the kept slots' ranks (rope_pos) stay 0..left-1 as they were."""
    removed = read - to
    if not 0 < removed <= filled:
        return None
    flat = lambda t: t.view(t.shape[0], -1, *t.shape[3:])  # noqa: E731  [layers, rows, kv_heads, ...]
    rows = _ring_rows(pool, blocks, filled)
    gone = flat(pool.pos)[:, rows] >= to  # [L, F, H]
    if not bool((gone.sum(1) == removed).all()):
        return None
    left = filled - removed
    idx = torch.arange(filled, device=rows.device)[None, :, None]
    hole, source = gone & (idx < left), ~gone & (idx >= left)  # as many of each per (layer, KV head)
    moves = int(hole.sum(1).max())
    slot_map = torch.where(gone, -1, idx.expand_as(gone))  # old ring slot -> new ring slot (-1: removed)
    if moves:
        dst = torch.where(hole, idx, idx + filled).argsort(dim=1)[:, :moves]  # holes first, in slot order
        src = torch.where(source, idx, idx + filled).argsort(dim=1)[:, :moves]
        real = hole.gather(1, dst)  # lanes beyond a (layer, head)'s own number of holes move nothing
        layer = torch.arange(gone.shape[0], device=rows.device)[:, None, None].expand_as(dst)[real]
        head = torch.arange(gone.shape[2], device=rows.device)[None, None, :].expand_as(dst)[real]
        dst, src = dst[real], src[real]
        for name in ring_tensor_names(pool):
            t = flat(getattr(pool, name))
            t[layer, rows[dst], head] = t[layer, rows[src], head]
        slot_map[layer, src, head] = dst
    edge = flat(pool.edge_slot)[:, rows[:left]].long()  # [L, left, H, M]: ring slots, -1 for none
    known = (edge >= 0) & (edge < filled)
    layer = torch.arange(edge.shape[0], device=rows.device)[:, None, None, None]
    head = torch.arange(edge.shape[2], device=rows.device)[None, None, :, None]
    target = torch.where(known, slot_map[layer, edge.clamp(0, filled - 1), head], -1)
    dead = target < 0
    flat(pool.edge_slot)[:, rows[:left]] = target.to(pool.edge_slot.dtype)
    for name, none in (("edge_pos", -1), ("edge_w", 0)):
        t = flat(getattr(pool, name))
        t[:, rows[:left]] = t[:, rows[:left]].masked_fill(dead, none)
    return left


def ring_tensor_names(pool) -> list[str]:
    """The pool's per-slot tensors ([layers, blocks + 1, block_size, ...]: k, v, pos, score, held, edges, and
    any added later): everything a ring holds in its blocks."""
    shape = pool.k.shape[:3]
    return sorted(name for name, t in vars(pool).items() if isinstance(t, torch.Tensor) and t.shape[:3] == shape)


@dataclass
class ParkedRing:
    """A ring that outlived its request: its pool blocks (ring order) and what a batch slot held of it."""

    owner: int  # its owner id in the pool's allocator
    blocks: list[int]
    num_processed: int  # tokens the ring has read: positions 0..num_processed-1
    ring_size: int  # slots it may hold (the ring size of the request that parked it)
    policy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    archive: object | None = None  # the minikv.archive.Archive its request kept, parked with the ring
    holes: int = 0  # slots a rollback removed and no token has refilled yet (Request.ring_holes)

    @property
    def filled(self) -> int:
        return min(self.ring_size, self.num_processed - self.holes)

    @property
    def has_evicted(self) -> bool:
        """Some token it read is no longer in it (its slots no longer hold positions 0..n-1 in order)."""
        return self.num_processed > self.filled


@dataclass
class Session:
    session_id: str
    kv_budget: int | None  # fixed by the first request; None under `full` (the ring holds the conversation)
    token_ids: list[int] = field(default_factory=list)  # the conversation so far, read or generated
    ring: ParkedRing | None = None  # None: never parked, released, or taken by the request running now
    request_id: str | None = None  # the request in flight on this session (at most one)
    text: str | None = None  # token_ids decoded (special tokens kept), made when first asked for
    positions: str | None = None  # the RoPE position mode its ring was written under, fixed by the first request

    def reusable_prefix(self, prompt_ids: list[int], rollback_window: int) -> int:
        """How many leading tokens of `prompt_ids` the parked ring can skip (0: none, start over). At least
        one prompt token is always left to compute: the last one's logits sample the first output. Once the
        ring has evicted, only a divergence within its last `rollback_window` tokens read is rolled back
        (SessionStore.rollback_window)."""
        ring = self.ring
        if ring is None:
            return 0
        common = _common_prefix(self.token_ids, prompt_ids, ring.num_processed)
        if common == ring.num_processed and common < len(prompt_ids):
            return common
        cached = min(common, len(prompt_ids) - 1)
        if ring.has_evicted and ring.num_processed - cached > rollback_window:
            return 0  # the tail to roll back may be evicted in some (layer, KV head): start over
        return cached


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class SessionInfo:
    """What `Engine.session` tells about a session: its history, and what its parked ring holds."""

    session_id: str
    token_ids: list[int]  # the conversation so far (read or generated)
    kv_budget: int | None  # fixed at its start; None under `full`
    parked: bool  # a ring is parked for it now (False: never parked, released, or its request runs now)
    num_ring_tokens: int  # tokens its parked ring has read (0 without one): the next turn skips these
    num_kv_blocks: int  # pool blocks its parked ring holds
    request_id: str | None  # its request in flight


@dataclass
class SessionCounters:
    hits: int = 0  # a session request that reused its parked ring
    misses: int = 0  # a continuing session request that found no reusable ring (prefilled from the start)
    reused_tokens: int = 0  # prompt tokens not prefilled again thanks to a parked ring
    released_by_pressure: int = 0  # parked rings released because admission or a limit needed their blocks


class SessionStore:
    """Every session, least recently used first, and the parked rings among them (see module docstring)."""

    def __init__(self, pool, policy, *, max_sessions: int = 1024, max_parked: int = 64,
                 max_parked_blocks: int | None = None, roll_back_evicted: bool = True):
        """`roll_back_evicted`: whether a ring that has evicted may be rolled back (roll_back_ring works on
        this process's pool: not under tensor parallelism, where other ranks hold the other KV heads)."""
        for name, value in (("max_sessions", max_sessions), ("max_parked", max_parked)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a count >= 0, got {value!r}")
        self.pool, self.policy = pool, policy
        self.max_sessions, self.max_parked = max_sessions, max_parked
        self.max_parked_blocks = pool.num_blocks if max_parked_blocks is None else max_parked_blocks
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.counters = SessionCounters()
        # How many of its last tokens a parked ring that has evicted may roll back: the protected recent
        # window, or none under a policy whose per-ring running state cannot be rolled back.
        self.rollback_window = policy.window if roll_back_evicted and not policy.ring_state_axes else 0
        self._owners = itertools.count(PARKED_OWNER_BASE)
        self.archives = None  # the engine's minikv.archive.ArchiveStore (None: no archives), for restoring them

    # --- gauges ----------------------------------------------------------------------------------
    @property
    def num_parked(self) -> int:
        return sum(1 for s in self.sessions.values() if s.ring is not None)

    @property
    def parked_blocks(self) -> int:
        return sum(len(s.ring.blocks) for s in self.sessions.values() if s.ring is not None)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def info(self, session: Session) -> SessionInfo:
        ring = session.ring
        return SessionInfo(session.session_id, list(session.token_ids), session.kv_budget, ring is not None,
                           ring.num_processed if ring else 0, len(ring.blocks) if ring else 0, session.request_id)

    # --- a request on a session ------------------------------------------------------------------
    def begin(self, session_id: str, request_id: str, kv_budget: int | None) -> Session:
        """Mark the session busy with `request_id` (creating it on first use) and make it most recent."""
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(session_id, kv_budget)
            self._forget_over_limit()
        elif session.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} already has a request in flight "
                                      f"({session.request_id!r}); wait for it to finish, or abort it")
        session.request_id = request_id
        self.sessions.move_to_end(session_id)
        return session

    def claim(self, session: Session, prompt_ids: list[int]) -> tuple[ParkedRing | None, int]:
        """Before admission: the parked ring the request can take over and the prompt tokens it skips, or
        (None, 0) after releasing a ring that cannot serve this prompt. Asking again changes nothing."""
        cached = session.reusable_prefix(prompt_ids, self.rollback_window)
        ring = session.ring
        if ring is not None and 0 < cached < ring.num_processed and ring.has_evicted:
            left = roll_back_ring(self.pool, ring.blocks, ring.filled, ring.num_processed, cached)
            if left is None:
                cached = 0  # a rollback after an earlier one may find part of the window evicted
            else:
                ring.num_processed, ring.holes = cached, cached - left
        if ring is not None and cached == 0:
            self._release(session)
        return session.ring, cached

    def admitted(self, session: Session, ring: ParkedRing | None, cached: int) -> None:
        """The request in flight was admitted, into its batch slot with `ring` (or with a new ring)."""
        if ring is not None:
            assert session.ring is ring
            session.ring = None  # the request holds it now
            self.counters.hits += 1
            self.counters.reused_tokens += cached
        elif session.token_ids:
            self.counters.misses += 1

    def finish(self, session: Session, token_ids: list[int], *, slot: int | None, num_processed: int,
               ring_size: int, keep_ring: bool, ring_holes: int = 0, archive=None) -> bool:
        """The session's request ended; its history becomes `token_ids`. With `keep_ring` its ring (in batch
        slot `slot`) is parked, and its KV `archive` (if it kept one) with it. Returns whether the slot's blocks
        were taken: if not, the caller frees them (and closes the archive)."""
        session.request_id = None
        session.token_ids = list(token_ids)
        session.text = None
        parked = keep_ring and slot is not None and num_processed > 0
        if parked:
            state = self.policy.ring_state(slot)
            owner = next(self._owners)
            blocks = self.pool.park(slot, owner)
            session.ring = ParkedRing(owner, blocks, num_processed, ring_size, state, archive=archive,
                                      holes=ring_holes)
            if archive is not None:
                archive.park()
        if session.session_id in self.sessions:
            self.sessions.move_to_end(session.session_id)
        self._enforce_limits()
        return parked

    @staticmethod
    def take_archive(ring: ParkedRing, own, cached: int):
        """The archive of the request that takes over `ring`, whose prompt continues at position `cached`: the
        ring's parked archive, continued (its newest tokens past `cached` dropped, the request's own budget,
        its recall count from 0), if the request keeps an archive (`own`, freshly opened and then closed);
        else `own`, and a parked archive nobody continues is freed."""
        parked, ring.archive = ring.archive, None
        if parked is None:
            return own
        if own is None:
            parked.close()
            return None
        own.close()
        parked.parked = False
        parked.truncate(cached)
        parked.set_budget(own.budget)
        parked.recalled = 0
        return parked

    def cancel(self, session: Session) -> None:
        """The session's request ended before admission: nothing of the session changed."""
        session.request_id = None

    # --- releasing parked rings ------------------------------------------------------------------
    def release_for(self, blocks: int, keep: Session | None = None) -> None:
        """Release parked rings, least recently used first, until `blocks` are unreserved (or none is left)."""
        for session in list(self.sessions.values()):
            if self.pool.num_unreserved >= blocks:
                return
            if session.ring is not None and session is not keep:
                self._release(session)
                self.counters.released_by_pressure += 1

    def _enforce_limits(self) -> None:
        for session in list(self.sessions.values()):
            if self.num_parked <= self.max_parked and self.parked_blocks <= self.max_parked_blocks:
                return
            if session.ring is not None:
                self._release(session)
                self.counters.released_by_pressure += 1

    def _release(self, session: Session) -> None:
        """Free a parked ring's blocks and its archive: the session's next turn prefills its history again,
        and a request that keeps an archive fills a new one as it does."""
        self.pool.release(session.ring.owner)
        if session.ring.archive is not None:
            session.ring.archive.close()
        session.ring = None

    def close(self, session_id: str) -> bool:
        """Forget a session (its ring's blocks are free at once); False if it is unknown. The caller aborts
        its request in flight first."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        if session.ring is not None:
            self._release(session)
        return True

    def _forget_over_limit(self) -> None:
        for session_id in list(self.sessions):
            if len(self.sessions) <= self.max_sessions:
                return
            if self.sessions[session_id].request_id is None:
                self.close(session_id)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, session: Session, directory: str | os.PathLike, identity: dict) -> Path:
        """Write `session` as DIR/<id>.safetensors (the ring's tensors, the policy's ring state) and
        DIR/<id>.json (ids, ring geometry, `identity`: model, policy, block size, dtype). Returns the JSON path."""
        from safetensors.torch import save_file

        directory = Path(directory)
        stem = session_file_stem(session.session_id)
        tensors: dict[str, torch.Tensor] = {}
        ring = session.ring
        if ring is not None:
            for name in ring_tensor_names(self.pool):
                tensors[f"ring.{name}"] = read_ring(self.pool, name, ring.blocks, ring.filled).cpu().contiguous()
            for name, value in ring.policy_state.items():
                tensors[f"policy.{name}"] = value.cpu().contiguous()
        archive_meta = None
        if ring is not None and ring.archive is not None:
            archive_meta, archive_tensors = ring.archive.state()
            tensors.update(archive_tensors)
        meta = dict(format=FILE_FORMAT, version=FILE_VERSION, session_id=session.session_id,
                    kv_budget=session.kv_budget, token_ids=session.token_ids, identity=identity,
                    positions=session.positions,
                    ring=None if ring is None else dict(num_processed=ring.num_processed, ring_size=ring.ring_size,
                                                        num_blocks=len(ring.blocks), holes=ring.holes,
                                                        archive=archive_meta))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tensor_path, json_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
            tmp = directory / f".{stem}.safetensors.tmp"
            save_file(tensors, str(tmp))
            meta["tensors_sha256"] = _sha256(tmp)
            os.replace(tmp, tensor_path)
            tmp_json = directory / f".{stem}.json.tmp"
            tmp_json.write_text(json.dumps(meta))
            os.replace(tmp_json, json_path)
        except OSError as err:
            raise SessionFileError(f"cannot save session {session.session_id!r} to {str(directory)!r}: "
                                   f"{err.strerror or err}; pick a writable directory") from None
        return json_path

    def load(self, path: str | os.PathLike, identity: dict) -> Session:
        """Read a session saved by `save` (its JSON path, or the directory and session id's stem) and park
        its ring; a file from another model/policy/block size/dtype, or a damaged one, raises
        SessionFileError and changes nothing. With no room in the pool, only the history is restored."""
        meta, tensors = read_session_file(path, identity)
        session_id = meta["session_id"]
        existing = self.sessions.get(session_id)
        if existing is not None and existing.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} has a request in flight; it cannot be restored over")
        ring_meta = meta["ring"]
        ring = None
        if ring_meta is not None:
            ring = self._restore_ring(ring_meta, tensors)
        if existing is not None:
            self.close(session_id)
        session = self.sessions[session_id] = Session(session_id, meta["kv_budget"], list(meta["token_ids"]), ring,
                                                      positions=meta.get("positions"))
        self._forget_over_limit()
        self._enforce_limits()
        return session

    def _restore_ring(self, ring_meta: dict, tensors: dict[str, torch.Tensor]) -> ParkedRing | None:
        num_blocks, holes = int(ring_meta["num_blocks"]), int(ring_meta.get("holes", 0))
        filled = min(int(ring_meta["ring_size"]), int(ring_meta["num_processed"]) - holes)
        if not 0 <= holes < int(ring_meta["num_processed"]):
            raise SessionFileError(f"the session file's ring has {holes} holes in {ring_meta['num_processed']} "
                                   "tokens read (corrupt)")
        if num_blocks < self.pool.blocks_for(filled) or num_blocks > self.pool.num_blocks:
            raise SessionFileError(f"the session file's ring ({num_blocks} blocks for {filled} slots) does not fit "
                                   f"this engine's pool ({self.pool.num_blocks} blocks of {self.pool.block_size})")
        state = {name[len("policy."):]: t for name, t in tensors.items() if name.startswith("policy.")}
        if set(state) != set(self.policy.ring_state_axes):
            raise SessionFileError("the session file's policy state does not match this engine's policy")
        names = ring_tensor_names(self.pool)
        if {n for n in tensors if n.startswith("ring.")} != {f"ring.{n}" for n in names}:
            raise SessionFileError("the session file's ring tensors are not this engine's pool's: "
                                   f"{sorted(n for n in tensors if n.startswith('ring.'))} vs {names}")
        for name in names:
            t = tensors.get(f"ring.{name}")
            pool_t = getattr(self.pool, name)
            if t is None or t.dtype != pool_t.dtype or t.shape != (pool_t.shape[0], filled, *pool_t.shape[3:]):
                raise SessionFileError(f"the session file's ring tensor {name!r} is missing or has another shape "
                                       "or dtype than this engine's pool")
        archive_meta = ring_meta.get("archive")
        if archive_meta is not None and self.archives is None:
            archive_meta = None  # an engine without archives restores the ring alone
        if archive_meta is not None:
            try:
                if not isinstance(archive_meta, dict):
                    raise ValueError("its description is not an object")
                self.archives.check(archive_meta, tensors)
            except ValueError as err:
                raise SessionFileError(f"the session file's KV archive does not fit this engine: {err}") from None
        self.release_for(num_blocks)
        if num_blocks > self.pool.num_unreserved:
            return None  # no room now: the history alone comes back, the next turn prefills it (and its archive)
        archive = None
        if archive_meta is not None:
            archive = self.archives.restore(archive_meta, tensors)
            archive.parked = True
        owner = next(self._owners)
        blocks = self.pool.take(owner, num_blocks)
        for name in names:
            write_ring(self.pool, name, blocks, tensors[f"ring.{name}"])
        return ParkedRing(owner, blocks, int(ring_meta["num_processed"]), int(ring_meta["ring_size"]),
                          {name: t.to(self.pool.k.device) for name, t in state.items()}, archive=archive,
                          holes=holes)


def session_file_stem(session_id: str) -> str:
    """A file name for any session id (percent-encoded: no path separators, no leading dot)."""
    stem = urllib.parse.quote(session_id, safe="-_")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


def read_session_file(path: str | os.PathLike, identity: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON metadata and the tensors of a saved session, checked against `identity`."""
    from safetensors.torch import load_file

    json_path = Path(path)
    if json_path.suffix != ".json":
        json_path = json_path.with_suffix(".json")
    try:
        meta = json.loads(json_path.read_text())
    except OSError as err:
        raise SessionFileError(f"cannot read session file {str(json_path)!r}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError):
        raise SessionFileError(f"session file {str(json_path)!r} is not valid JSON (truncated or corrupt)") from None
    if isinstance(meta, dict) and meta.get("format") == FILE_FORMAT and meta.get("version") == 1:
        raise SessionFileError(f"{str(json_path)!r} is a version 1 minikv session file, written by an older minikv "
                               f"that stored keys in another channel order; this one reads version {FILE_VERSION}: "
                               "recreate the session (send its conversation again)")
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
        raise SessionFileError(f"{str(json_path)!r} is not a minikv session file (format {FILE_FORMAT} "
                               f"version {FILE_VERSION})")
    for key in ("session_id", "token_ids", "identity", "tensors_sha256"):
        if key not in meta:
            raise SessionFileError(f"session file {str(json_path)!r} lacks {key!r} (truncated or corrupt)")
    theirs = meta["identity"]
    for key, ours in identity.items():
        if theirs.get(key) != ours:
            raise SessionFileError(f"session file {str(json_path)!r} was saved with {key} {theirs.get(key)!r}, but "
                                   f"this engine runs {ours!r}: a ring only makes sense to the same {key}")
    tensor_path = json_path.with_suffix(".safetensors")
    try:
        digest = _sha256(tensor_path)
    except OSError as err:
        raise SessionFileError(f"cannot read session tensors {str(tensor_path)!r}: {err.strerror or err}") from None
    if digest != meta["tensors_sha256"]:
        raise SessionFileError(f"session tensors {str(tensor_path)!r} do not match their checksum (truncated, "
                               "corrupt, or from another save)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise SessionFileError(f"cannot read session tensors {str(tensor_path)!r}: {err}") from None
    ids = meta["token_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t for t in ids):
        raise SessionFileError(f"session file {str(json_path)!r} has invalid token_ids")
    return meta, tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
