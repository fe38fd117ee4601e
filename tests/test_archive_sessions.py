"""Sessions keep their KV archive with their ring (minikv.session, minikv.archive): parked with it, continued by
the next turn, saved and restored bitwise, freed with it (a release, a close, a turn without an archive), and
the archive store's accounting stays exact throughout."""

from __future__ import annotations

import random

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv.archive import RecallRule, _Block

GREEDY = dict(temperature=0, ignore_eos=True)


def engine(loaded, **kwargs) -> Engine:
    options = dict(policy="nexus", budget=32, n_sink=2, window=4, chunk=16, max_num_seqs=2, max_model_len=4096,
                   recall_interval=4, recall_rule=RecallRule(threshold=0.02, min_votes=1, span=1))  # recalls happen
    return Engine(loaded, **{**options, **kwargs})


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 259) for _ in range(n)]


def params(archive_budget: int = 10**4, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, archive_budget=archive_budget, **GREEDY)


def turn(e: Engine, prompt: list[int], sampling: SamplingParams, session_id: str = "s"):
    return e.generate(prompt, sampling, session_id=session_id, use_tqdm=False)[0]


def parked_archive(e: Engine, session_id: str = "s"):
    return e.sessions.get(session_id).ring.archive


def assert_archive_accounting(e: Engine) -> None:
    """Every live archive belongs to a running request or to one parked ring, and the store's count is theirs."""
    store = e.archive
    owned = [r.archive for r in e.scheduler.running if r.archive is not None]
    owned += [s.ring.archive for s in e.sessions.sessions.values() if s.ring is not None and s.ring.archive is not None]
    assert len(owned) == len({id(a) for a in owned}) == len(store.archives)
    assert {id(a) for a in owned} == {id(a) for a in store.archives}
    assert store.tokens == sum(a.size for a in store.archives)
    for s in e.sessions.sessions.values():
        if s.ring is not None and s.ring.archive is not None:
            archive = s.ring.archive
            assert archive.parked and not archive.closed
            # it holds the newest tokens the ring read, in order: positions .. num_processed - 1
            assert torch.equal(archive.positions(), torch.arange(s.ring.num_processed - archive.size,
                                                                 s.ring.num_processed, dtype=torch.int32))


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_a_session_continues_its_archive_over_turns(loaded, positions):
    e = engine(loaded, positions=positions)
    rng, transcript, recalled = random.Random(0), [], 0
    for i in range(3):
        out = turn(e, transcript + tokens(rng, 50), params())
        transcript = out.prompt_token_ids + out.outputs[0].token_ids
        archive, ring = parked_archive(e), e.sessions.get("s").ring
        # one archive over the whole conversation (a fresh one per turn would start at the turn's first token)
        assert torch.equal(archive.positions(), torch.arange(ring.num_processed, dtype=torch.int32))
        assert (out.num_cached_tokens > 0) == (i > 0)  # the parked ring continued
        assert out.metrics.num_recalled_tokens == archive.recalled  # this turn's recalls, counted from 0
        recalled += archive.recalled
        assert_archive_accounting(e)
    assert recalled > 0 and e.archive.recalled_total == recalled
    assert e.close_session("s")
    assert e.archive.tokens == 0 and not e.archive.archives


def test_a_restored_session_has_a_bitwise_identical_archive_and_continues_alike(loaded, tmp_path):
    stays, restored = engine(loaded), engine(loaded)
    rng = random.Random(1)
    out = turn(stays, tokens(rng, 100), params())
    path = stays.save_session("s", tmp_path)
    assert restored.restore_session(path) == "s"
    a, b = parked_archive(stays), parked_archive(restored)
    assert b is not a and b.parked and (b.budget, b.size, b.decode_steps) == (a.budget, a.size, a.decode_steps)
    assert [(x.start, x.end) for x in a.blocks] == [(x.start, x.end) for x in b.blocks]
    for x, y in zip(a.blocks, b.blocks, strict=True):
        for name in _Block.TENSORS:
            assert torch.equal(getattr(x, name)[..., x.start: x.end, :] if name in ("k", "v") else
                               getattr(x, name)[x.start: x.end] if name == "pos" else getattr(x, name),
                               getattr(y, name)[..., y.start: y.end, :] if name in ("k", "v") else
                               getattr(y, name)[y.start: y.end] if name == "pos" else getattr(y, name)), name
    assert restored.archive.tokens == stays.archive.tokens == a.size
    nxt = out.prompt_token_ids + out.outputs[0].token_ids + tokens(rng, 30)
    x, y = turn(stays, nxt, params()), turn(restored, nxt, params())
    assert x.outputs[0].token_ids == y.outputs[0].token_ids and x.outputs[0].logprobs == y.outputs[0].logprobs
    assert x.metrics.num_recalled_tokens == y.metrics.num_recalled_tokens > 0
    assert torch.equal(parked_archive(stays).positions(), parked_archive(restored).positions())
    assert_archive_accounting(stays)
    assert_archive_accounting(restored)


def test_a_session_file_without_an_archive_still_loads_and_a_damaged_archive_is_refused(loaded, tmp_path):
    import json

    from minikv import SessionFileError

    e = engine(loaded)
    turn(e, tokens(random.Random(2), 60), params(archive_budget=0))
    assert e.sessions.get("s").ring.archive is None
    path = e.save_session("s", tmp_path)
    assert json.loads(open(path).read())["ring"]["archive"] is None
    other = engine(loaded)
    other.restore_session(path)
    assert other.sessions.get("s").ring.archive is None and other.archive.tokens == 0
    turn(e, tokens(random.Random(3), 60), params(), session_id="t")
    path = e.save_session("t", tmp_path)
    meta = json.loads(open(path).read())
    for bad in ([5, 99], ["0", 3], None):
        meta["ring"]["archive"]["spans"][0] = bad
        open(path, "w").write(json.dumps(meta))
        with pytest.raises(SessionFileError, match="archive"):
            other.restore_session(path)
        assert other.session("t") is None and other.archive.tokens == 0  # nothing changed
        assert other.session("s").parked  # its parked ring untouched


def test_a_released_ring_frees_its_archive_and_the_next_turn_rebuilds_it_from_history(loaded):
    per_block = engine(loaded).pool.bytes_per_block
    e = engine(loaded, kv_memory=2 * per_block)  # one ring of 32 slots
    fresh = engine(loaded)
    rng = random.Random(4)
    out = turn(e, tokens(rng, 60), params())
    size = parked_archive(e).size
    assert e.archive.tokens == size > 0
    # a request that needs most of the pool: the parked ring is released, and its archive with it
    e.generate(tokens(rng, 100), params(archive_budget=0, max_tokens=4), use_tqdm=False)
    assert not e.session("s").parked and e.stats().sessions_released_by_pressure == 1
    assert e.archive.tokens == 0 and not e.archive.archives
    prompt = out.prompt_token_ids + out.outputs[0].token_ids + tokens(rng, 20)
    again = turn(e, prompt, params())
    assert again.num_cached_tokens == 0
    # re-prefilled from the history with a new archive: what a fresh request with that prompt computes
    want = fresh.generate(prompt, params(), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == want.outputs[0].token_ids
    assert torch.equal(parked_archive(e).positions(), torch.arange(e.sessions.get("s").ring.num_processed,
                                                                   dtype=torch.int32))
    assert_archive_accounting(e)


def test_a_rolled_back_session_drops_its_archives_newer_tokens(loaded):
    e = engine(loaded, budget=64)
    rng = random.Random(5)
    out = turn(e, tokens(rng, 30), params(max_tokens=4))  # 33 tokens read: the ring of 64 has evicted nothing
    assert parked_archive(e).size == 33
    prompt = out.prompt_token_ids[:20] + tokens(rng, 15)  # diverges at position 20
    again = turn(e, prompt, params(max_tokens=4))
    assert again.num_cached_tokens == 20
    assert torch.equal(parked_archive(e).positions(), torch.arange(20 + 15 + 3, dtype=torch.int32))
    assert_archive_accounting(e)


def test_a_turn_without_an_archive_frees_the_parked_one(loaded):
    e = engine(loaded)
    rng = random.Random(6)
    out = turn(e, tokens(rng, 60), params())
    assert e.archive.tokens > 0
    turn(e, out.prompt_token_ids + out.outputs[0].token_ids + tokens(rng, 10), params(archive_budget=0))
    assert e.sessions.get("s").ring.archive is None and e.archive.tokens == 0 and not e.archive.archives
    # and a turn with a smaller budget keeps only that many of the newest tokens
    out = turn(e, tokens(rng, 60), params(), session_id="u")
    prompt = out.prompt_token_ids + out.outputs[0].token_ids + tokens(rng, 10)
    turn(e, prompt, params(archive_budget=40), session_id="u")
    archive, ring = parked_archive(e, "u"), e.sessions.get("u").ring
    assert archive.budget == 40 and torch.equal(archive.positions(), torch.arange(ring.num_processed - 40,
                                                                                  ring.num_processed,
                                                                                  dtype=torch.int32))
    assert_archive_accounting(e)


def test_random_soak_of_sessions_with_archives(loaded):
    rng = random.Random(7)
    per_block = engine(loaded).pool.bytes_per_block
    e = engine(loaded, kv_memory=5 * per_block, max_parked_sessions=3)  # two rings and a half: releases
    e.archive.memory = 12 * 32 * e.archive.bytes_per_token  # tight: parked archives lose their oldest tokens too
    history: dict[str, list[int]] = {}
    for step in range(40):
        name = rng.choice("abcde")
        if rng.random() < 0.1:
            e.close_session(name)
            history.pop(name, None)
        else:
            sampling = params(archive_budget=rng.choice([0, 20, 100, 10**4]), max_tokens=rng.randrange(1, 10))
            session = e.sessions.get(name)
            sampling.positions = session.positions if session else rng.choice(["original", "ring"])
            prompt = history.get(name, []) + tokens(rng, rng.randrange(1, 40))
            rid = e.add_request(prompt, sampling, session_id=name)
            for _ in range(rng.randrange(1, 12)):
                if not e.has_unfinished_requests():
                    break
                e.step()
                assert_archive_accounting(e)
                assert e.archive.bytes_used <= e.archive.memory
            if e.has_unfinished_requests():
                e.abort(rid)
                e.step()
            history[name] = e.session(name).token_ids
        assert_archive_accounting(e)
    stats = e.stats()
    assert stats.sessions_released_by_pressure > 0 and stats.session_hits > 0 and stats.recalled_tokens > 0
    for name in list(history):
        e.close_session(name)
    assert e.archive.tokens == 0 and not e.archive.archives


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_a_rolled_back_turn_drops_the_archived_tail_with_the_rings(loaded, positions):
    """The ring has evicted and the next prompt changes the last reply's last tokens: the ring rolls them back
    (docs/design.md, section 10) and the archive, which had written them through, drops them too, so it
    holds each position of the conversation once, in order, after the next turn."""
    e = engine(loaded, positions=positions)
    rng = random.Random(3)
    out = turn(e, tokens(rng, 60), params())
    transcript = out.prompt_token_ids + out.outputs[0].token_ids
    ring = e.sessions.get("s").ring
    assert ring.has_evicted and ring.num_processed == len(transcript) - 1
    keep = len(transcript) - 3  # within the ring's protected window (4) of what it read
    changed = transcript[:keep] + [3 if transcript[keep] != 3 else 4] + tokens(rng, 20)
    assert changed[keep] != transcript[keep]
    again = turn(e, changed, params())
    assert again.num_cached_tokens == keep  # rolled back, not started over
    ring = e.sessions.get("s").ring
    assert ring.num_processed == len(changed) + len(again.outputs[0].token_ids) - 1
    assert_archive_accounting(e)  # the archive's positions are 0..num_processed-1's newest, each once
    assert parked_archive(e).size == ring.num_processed  # an ample archive: the whole conversation
