"""Sessions: a divergence inside the ring's protected recent window is rolled back after the ring has evicted
(minikv.session.roll_back_ring): the tail's slots are removed per (layer, KV head), the ring holds fewer
slots than its budget until new tokens refill them."""

from __future__ import annotations

import random

import pytest
import torch

from minikv import Engine, SamplingParams
from test_sessions import GREEDY, assert_pool_accounting, new_tokens, parked_ring

BUDGET, WINDOW = 64, 16
KW = dict(policy="nexus", budget=BUDGET, window=WINDOW, chunk=32, max_num_seqs=2, max_model_len=4096)


def rows(ring: dict[str, torch.Tensor]):
    """(layer, KV head) -> {position: slot} of a ring read by parked_ring."""
    pos = ring["pos"]  # [layers, slots, kv_heads]
    return {(layer, h): {int(p): s for s, p in enumerate(pos[layer, :, h].tolist())}
            for layer in range(pos.shape[0]) for h in range(pos.shape[2])}


def assert_ranks_follow_positions(ring: dict[str, torch.Tensor]) -> None:
    """positions="ring": every slot's rope_pos is its position's rank among the ring's positions."""
    ranks = ring["pos"].argsort(dim=1).argsort(dim=1)
    assert torch.equal(ring["rope_pos"].long(), ranks)


def two_runs(loaded, prompt, max_tokens, k, **extra):
    """A session that read prompt + max_tokens - 1 tokens (it has evicted), and a reference session that
    stopped k tokens earlier (it never read the last k)."""
    full, ref = Engine(loaded, **KW, **extra), Engine(loaded, **KW, **extra)
    a = full.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), session_id="s", use_tqdm=False)[0]
    b = ref.generate(prompt, SamplingParams(max_tokens=max_tokens - k, **GREEDY), session_id="s", use_tqdm=False)[0]
    assert a.outputs[0].token_ids[: max_tokens - k] == b.outputs[0].token_ids
    return full, ref


@pytest.mark.parametrize("positions,options", [(None, {}), ("ring", {}), (None, {"gamma": 0.5})])
def test_a_rollback_after_eviction_removes_the_tail_and_nothing_else(loaded, positions, options):
    """nexus, and nexus with the walk on (out-edges between slots, renumbered when slots move)."""
    rng = random.Random(11)
    prompt, m, k = new_tokens(rng, 150, 151), 12, 5
    full, ref = two_runs(loaded, prompt, m, k, positions=positions, policy_options=options)
    read = len(prompt) + m - 1
    to = read - k
    before, want = parked_ring(full, "s"), parked_ring(ref, "s")
    session = full.sessions.get("s")
    assert session.ring.has_evicted and session.ring.filled == BUDGET
    # The next prompt keeps `to` tokens of the history, then differs (a reply re-tokenized, say).
    prompt2 = session.token_ids[:to] + [9, 9, 9]
    ring, cached = full.sessions.claim(session, prompt2)
    assert ring is session.ring and cached == to == ring.num_processed
    assert ring.filled == BUDGET - k and ring.holes == to - (BUDGET - k) and ring.has_evicted
    assert full.sessions.claim(session, prompt2) == (ring, cached)  # asking again changes nothing
    after = parked_ring(full, "s")
    tail = set(range(to, read))
    checked = dict(moved=0, edges_followed=0)
    for (layer, head), slots in rows(after).items():
        had, ref_had = rows(before)[layer, head], rows(want)[layer, head]
        assert set(slots) == set(had) - tail  # the tail is gone, every other token stayed
        # What the reference ring holds less: the k tokens evicted while the tail was read, nothing else.
        assert set(slots) <= set(ref_had) and len(set(ref_had) - set(slots)) == k
        for p, s in slots.items():
            old = had[p]
            checked["moved"] += old != s
            for name in ("k", "v", "score", "held", "rope_pos"):
                if name == "rope_pos" and positions == "ring":
                    continue  # ranks: checked below
                assert torch.equal(after[name][layer, s, head], before[name][layer, old, head]), (name, p)
            for name in ("k", "v"):  # the tokens' K/V are the ones the never-rolled-back ring computed
                assert torch.equal(after[name][layer, s, head], want[name][layer, ref_had[p], head]), (name, p)
            # Out-edges follow their targets to their new slots; an edge to a removed token is dropped.
            for j in range(after["edge_slot"].shape[-1]):
                e_old = int(before["edge_slot"][layer, old, head, j])
                target = int(before["edge_pos"][layer, old, head, j])
                e_new = int(after["edge_slot"][layer, s, head, j])
                alive = 0 <= e_old < BUDGET and int(before["pos"][layer, e_old, head]) == target
                if alive and target < to:
                    assert e_new == slots[target] and int(after["edge_pos"][layer, s, head, j]) == target
                    checked["edges_followed"] += slots[target] != e_old
                elif alive:
                    assert e_new == -1 and float(after["edge_w"][layer, s, head, j]) == 0
    assert checked["moved"] > 0
    if options:  # the walk records edges (to earlier tokens): some pointed at slots that moved
        assert checked["edges_followed"] > 0, checked
    if positions == "ring":
        assert_ranks_follow_positions(after)
    assert_pool_accounting(full)


@pytest.mark.parametrize("positions", [None, "ring"])
def test_the_holes_are_refilled_before_anything_is_evicted_and_the_ring_stays_bounded(loaded, positions):
    rng = random.Random(12)
    prompt, m, k = new_tokens(rng, 150, 151), 12, 5
    full, _ = two_runs(loaded, prompt, m, k, positions=positions)
    read = len(prompt) + m - 1
    to = read - k
    session = full.sessions.get("s")
    full.sessions.claim(session, session.token_ids[:to] + [9, 9])
    rolled = rows(parked_ring(full, "s"))
    # Two new prompt tokens (prefill) and two decoded ones fill 4 of the 5 holes: no eviction yet, so the
    # ring is exactly what it held plus the four new positions (the decode step writes into a hole, not
    # over a victim, although the sequence's position is far past its budget).
    out = full.generate(session.token_ids[:to] + [9, 9], SamplingParams(max_tokens=3, **GREEDY), session_id="s",
                        use_tqdm=False)[0]
    assert out.num_cached_tokens == to
    ring = full.sessions.get("s").ring
    assert ring.num_processed == to + 4 and ring.filled == BUDGET - 1
    now = parked_ring(full, "s")
    for key, slots in rows(now).items():
        assert set(slots) == set(rolled[key]) | set(range(to, to + 4))
    if positions == "ring":
        assert_ranks_follow_positions(now)
    # The stream goes on: turns that evict again keep the ring at its budget, distinct positions, sinks.
    transcript = full.sessions.get("s").token_ids
    for turn in range(4):
        prompt = transcript + new_tokens(rng, 10, 40)
        got = full.generate(prompt, SamplingParams(max_tokens=4, **GREEDY), session_id="s", use_tqdm=False)[0]
        assert got.num_cached_tokens == len(transcript) - 1  # the ring read all but the last sampled token
        transcript = prompt + got.outputs[0].token_ids
        now = parked_ring(full, "s")
        assert now["pos"].shape[1] == BUDGET
        for slots in rows(now).values():
            assert len(slots) == BUDGET and set(range(4)) <= set(slots) and max(slots) < len(transcript) - 1
        if positions == "ring":
            assert_ranks_follow_positions(now)
        assert_pool_accounting(full)


def test_a_chat_re_rendered_with_another_reply_tail_reuses_the_evicted_ring_and_answers(loaded):
    """The client sends back the reply's text a little changed (here: its last characters dropped): the
    rendered ids differ from what the ring read only in the last reply's tail, inside the window."""
    engine = Engine(loaded, **KW)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    messages = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]
    first = engine.chat(messages, params, session_id="c", use_tqdm=False)[0]
    ring = engine.sessions.get("c").ring
    assert ring.has_evicted and len(first.outputs[0].text) > 2
    history, read = engine.session("c").token_ids, ring.num_processed
    messages += [{"role": "assistant", "content": first.outputs[0].text[:-2]}, {"role": "user", "content": "more?"}]
    got = engine.chat(messages, params, session_id="c", use_tqdm=False)[0]
    common = next(i for i, (a, b) in enumerate(zip(history, got.prompt_token_ids)) if a != b)
    assert read - WINDOW <= common < read  # a divergence inside the window
    assert got.num_cached_tokens == common > 0  # rolled back, not started over
    assert len(got.outputs[0].token_ids) == 6 and engine.stats().session_hits == 1
    assert engine.session("c").token_ids == got.prompt_token_ids + got.outputs[0].token_ids
    assert_pool_accounting(engine)


@pytest.mark.parametrize("policy,options", [("nexus", {}), ("nestedkv", {}), ("epikv-lag", {"lag": 20})])
def test_a_divergence_before_the_window_or_under_per_ring_state_starts_over(loaded, policy, options):
    engine = Engine(loaded, **{**KW, "policy": policy, "policy_options": options})
    rng = random.Random(13)
    prompt = new_tokens(rng, 150, 151)
    engine.generate(prompt, SamplingParams(max_tokens=6, **GREEDY), session_id="s", use_tqdm=False)
    session = engine.sessions.get("s")
    read = session.ring.num_processed
    assert session.ring.has_evicted
    # nexus rolls back what its window protects; a policy with per-ring running state cannot roll back.
    inside = session.token_ids[: read - 3] + [9, 9]
    window = engine.sessions.rollback_window
    assert session.reusable_prefix(inside, window) == (read - 3 if policy == "nexus" else 0)
    beyond = session.token_ids[: read - WINDOW - 1] + [9, 9]
    assert session.reusable_prefix(beyond, window) == 0
    out = engine.generate(beyond, SamplingParams(max_tokens=2, **GREEDY), session_id="s", use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and engine.stats().session_misses == 1
    assert_pool_accounting(engine)


def test_a_ring_parked_with_holes_is_saved_and_restored_bitwise_and_continues_alike(loaded, tmp_path):
    """Regenerating a reply (the prompt is the history up to before the last reply) rolls back the reply;
    a short answer parks the ring before the holes are refilled; the holes travel through the file."""
    stays, restored = Engine(loaded, **KW), Engine(loaded, **KW)
    rng = random.Random(14)
    prompt = new_tokens(rng, 150, 151)
    stays.generate(prompt, SamplingParams(max_tokens=10, **GREEDY), session_id="s", use_tqdm=False)
    again = stays.generate(prompt, SamplingParams(max_tokens=2, **GREEDY), session_id="s", use_tqdm=False)[0]
    # Rolled back: the reply's 9 tokens read and the prompt's last (recomputed: its logits sample the answer).
    assert again.num_cached_tokens == len(prompt) - 1
    ring = stays.sessions.get("s").ring
    assert ring.holes > 0 and ring.filled == BUDGET - 10 + 2 and ring.num_processed == len(prompt) + 1
    path = stays.save_session("s", tmp_path)
    assert restored.restore_session(path) == "s"
    assert restored.sessions.get("s").ring.holes == ring.holes
    before, after = parked_ring(stays, "s"), parked_ring(restored, "s")
    for name in before:
        assert torch.equal(before[name], after[name]), name
    nxt = stays.session("s").token_ids + new_tokens(rng, 20, 21)
    a = stays.generate(nxt, SamplingParams(max_tokens=6, **GREEDY), session_id="s", use_tqdm=False)[0]
    b = restored.generate(nxt, SamplingParams(max_tokens=6, **GREEDY), session_id="s", use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.num_cached_tokens == b.num_cached_tokens > 0
    for name, value in parked_ring(stays, "s").items():
        assert torch.equal(value, parked_ring(restored, "s")[name]), name
    assert stays.sessions.get("s").ring.filled == BUDGET


def test_random_turns_that_extend_regenerate_or_re_tokenize_keep_the_ring_valid(loaded):
    """A session under nexus whose turns extend its history, regenerate the last reply, or diverge a few
    tokens before the end, at random: the ring stays a valid bounded ring with exact pool accounting, and
    every rollback the window allows reuses the ring."""
    engine = Engine(loaded, **{**KW, "max_num_seqs": 3})
    rng = random.Random(15)
    transcript: list[int] = []
    rolled = 0
    for turn in range(40):
        info = engine.session("s")
        read = info.num_ring_tokens if info else 0
        kind = rng.choice(["extend", "regenerate", "diverge"]) if transcript else "extend"
        if kind == "extend":
            prompt, want = transcript + new_tokens(rng, 1, 30), max(read, 0)
        else:
            cut = rng.randrange(max(read - WINDOW + 1, 1), read) if read > 1 else 1
            prompt = transcript[:cut] if kind == "regenerate" else transcript[:cut] + new_tokens(rng, 1, 5)
            common = next((i for i, (a, b) in enumerate(zip(transcript[:read], prompt)) if a != b),
                          min(read, len(prompt)))
            want = min(common, len(prompt) - 1)
        if rng.random() < 0.3:  # an unrelated request between turns
            engine.generate(new_tokens(rng, 5, 40), SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
        out = engine.generate(prompt, SamplingParams(max_tokens=rng.randrange(1, 8), **GREEDY), session_id="s",
                              use_tqdm=False)[0]
        if kind != "extend" and out.num_cached_tokens:
            rolled += 1
            assert out.num_cached_tokens == want
        elif kind == "extend":
            assert out.num_cached_tokens == want
        transcript = prompt + out.outputs[0].token_ids
        ring = engine.sessions.get("s").ring
        pos = parked_ring(engine, "s")["pos"]
        assert pos.shape[1] == ring.filled <= BUDGET
        for row in pos.transpose(1, 2).reshape(-1, pos.shape[1]).tolist():
            assert len(set(row)) == len(row) and max(row) < ring.num_processed
            assert set(range(min(4, ring.num_processed))) <= set(row)
        assert ring.num_processed == len(transcript) - 1
        assert_pool_accounting(engine)
    assert rolled >= 10
    engine.close_session("s")
    assert engine.pool.num_used == engine.pool.num_reserved == 0
