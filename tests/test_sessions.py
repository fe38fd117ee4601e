"""Sessions: a conversation keeps its ring between requests (minikv.session)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv import SessionFileError
from minikv.errors import InvalidRequestError
from minikv.session import read_ring, ring_tensor_names

GREEDY = dict(temperature=0, ignore_eos=True)


def new_tokens(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(rng.randrange(low, high))]


def parked_ring(engine: Engine, session_id: str) -> dict[str, torch.Tensor]:
    """The session's parked ring, read back in ring order ([layers, slots, ...] per pool tensor), with its
    policy state."""
    ring = engine.sessions.get(session_id).ring
    names = ring_tensor_names(engine.pool)
    assert {"k", "v", "pos", "score", "held", "edge_slot", "edge_pos", "edge_w"} <= set(names)
    out = {name: read_ring(engine.pool, name, ring.blocks, ring.filled).clone() for name in names}
    out.update({f"policy.{k}": v.clone() for k, v in ring.policy_state.items()})
    return out


def assert_pool_accounting(engine: Engine) -> None:
    """Every used block is owned by exactly one running request or one parked ring, and the reservations
    add up to what running requests reserved plus what parked rings hold."""
    pool = engine.pool
    running = {b: r.slot for r in engine.scheduler.running for b in r.blocks}
    parked = {b: s.ring.owner for s in engine.sessions.sessions.values() if s.ring is not None for b in s.ring.blocks}
    held = [b for r in engine.scheduler.running for b in r.blocks]
    held += [b for s in engine.sessions.sessions.values() if s.ring is not None for b in s.ring.blocks]
    assert len(held) == len(set(held)) == pool.num_used <= pool.num_blocks  # no block owned twice
    assert all(pool.owner_of(b) == owner for b, owner in {**running, **parked}.items())
    assert pool.num_reserved == (sum(r.num_blocks_needed for r in engine.scheduler.running)
                                 + engine.sessions.parked_blocks) <= pool.num_blocks


# --- with `full`, a session gives the tokens of the whole conversation sent fresh -----------------


@pytest.mark.parametrize("append", [False, True])
def test_full_session_gives_the_greedy_tokens_of_the_conversation_sent_fresh(loaded, append):
    session = Engine(loaded, policy="full", chunk=32, max_num_seqs=2, max_model_len=4096)
    fresh = Engine(loaded, policy="full", chunk=32, max_num_seqs=2, max_model_len=4096)
    rng, transcript, new_total = random.Random(0), [], 0
    params = SamplingParams(max_tokens=10, **GREEDY)
    for turn in range(6):
        new = new_tokens(rng, 5, 60)
        new_total += len(new)
        prompt = transcript + new
        got = session.generate(new if append else prompt, params, session_id="chat", append=append,
                               use_tqdm=False)[0]
        want = fresh.generate(prompt, params, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.prompt_token_ids == prompt
        # Everything the ring read is reused: the whole transcript but the last sampled token, never fed.
        assert got.num_cached_tokens == max(len(transcript) - 1, 0)
        transcript = prompt + got.outputs[0].token_ids
    stats = session.stats()
    assert stats.session_hits == 5 and stats.session_misses == 0
    # Prompt tokens computed: each turn's new ones, plus the token that ended the turn before (never fed).
    assert stats.prompt_tokens == new_total + 5
    assert session.session("chat").token_ids == transcript


def test_a_re_rendered_history_that_diverges_is_rolled_back_under_full(loaded):
    session = Engine(loaded, policy="full", chunk=32, max_model_len=4096)
    fresh = Engine(loaded, policy="full", chunk=32, max_model_len=4096)
    params = SamplingParams(max_tokens=8, **GREEDY)
    rng = random.Random(1)
    prompt = new_tokens(rng, 40, 41)
    first = session.generate(prompt, params, session_id="s", use_tqdm=False)[0]
    # The next prompt keeps the first 30 tokens and the generated tail is re-tokenized differently.
    changed = prompt[:30] + [7, 8, 9] + new_tokens(rng, 20, 21)
    got = session.generate(changed, params, session_id="s", use_tqdm=False)[0]
    assert got.num_cached_tokens == 30
    assert got.outputs[0].token_ids == fresh.generate(changed, params, use_tqdm=False)[0].outputs[0].token_ids
    assert first.outputs[0].token_ids  # the first turn ran
    # The same prompt again: one token is recomputed (its logits sample the answer), the rest is reused.
    again = session.generate(changed + got.outputs[0].token_ids, params, session_id="s", use_tqdm=False)[0]
    assert again.num_cached_tokens == len(changed) + len(got.outputs[0].token_ids) - 1


def test_session_chat_reuses_the_ring_and_the_stop_token_is_fed_next_turn(loaded):
    engine = Engine(loaded, policy="full", chunk=32, max_model_len=4096)
    fresh = Engine(loaded, policy="full", chunk=32, max_model_len=4096)
    params = SamplingParams(temperature=0, max_tokens=6)
    messages = [{"role": "user", "content": "hello there"}]
    for turn in range(3):
        got = engine.chat(messages, params, session_id="c", use_tqdm=False)[0]
        want = fresh.chat(messages, params, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        if turn:
            assert got.num_cached_tokens > 0
        messages = messages + [{"role": "assistant", "content": got.outputs[0].text},
                               {"role": "user", "content": f"and turn {turn}?"}]


def test_match_session_finds_the_ring_a_prompt_extends_but_never_takes_a_ring_for_a_shared_beginning(loaded):
    engine = Engine(loaded, policy="full", window=8, chunk=32, max_model_len=4096)
    params = SamplingParams(max_tokens=6, **GREEDY)
    rng = random.Random(7)
    a, b = new_tokens(rng, 60, 61), new_tokens(rng, 60, 61)
    transcript = a + engine.generate(a, params, session_id="A", use_tqdm=False)[0].outputs[0].token_ids
    engine.generate(b, params, session_id="B", use_tqdm=False)
    assert engine.match_session(transcript + [5, 6]) == "A"
    assert engine.match_session(transcript[:-3] + [7, 7, 7, 5]) == "A"  # a divergence in the last window
    assert engine.match_session(a[:20] + [9] * 40) is None  # shares only a beginning: A's ring stays A's
    assert engine.match_session(new_tokens(rng, 30, 31)) is None
    engine.add_request(transcript + [5], params, session_id="A")
    assert engine.match_session(transcript + [5, 6]) is None  # busy sessions are not offered


# --- the policy's per-ring state moves with the ring ---------------------------------------------


@pytest.mark.parametrize("policy,options", [("nexus", {}), ("h2o", {}), ("epikv", {}), ("nestedkv", {}),
                                            ("epikv-lag", {"lag": 50}), ("snapkv", {})])
def test_a_parked_ring_resumed_in_another_batch_slot_is_the_same_stream(loaded, policy, options):
    """The reference keeps the session in slot 0 with nothing between its turns; the other run resumes it in
    slot 1, 2, 1, ..., each time just after an unrelated request has used that slot (resetting and rewriting
    that slot's policy state). The rings must be bitwise equal after every turn."""
    kw = dict(policy=policy, budget=64, window=8, chunk=32, max_num_seqs=3, max_model_len=4096,
              policy_options=options)
    ref, moved = Engine(loaded, **kw), Engine(loaded, **kw)
    rng = random.Random(2)
    params = SamplingParams(max_tokens=6, **GREEDY)

    def next_admission_in(slot: int) -> None:
        moved.batch._free = [s for s in range(3) if s != slot] + [slot]  # pop() takes the last

    transcript: list[int] = []
    for turn in range(4):
        prompt = transcript + new_tokens(rng, 20, 50)
        a = ref.generate(prompt, params, session_id="s", use_tqdm=False)[0]
        next_admission_in(1 + turn % 2)
        moved.generate(new_tokens(rng, 40, 41), params, use_tqdm=False)
        next_admission_in(1 + turn % 2)
        b = moved.generate(prompt, params, session_id="s", use_tqdm=False)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        ring_a, ring_b = parked_ring(ref, "s"), parked_ring(moved, "s")
        assert ring_a.keys() == ring_b.keys()
        for name in ring_a:
            assert torch.equal(ring_a[name], ring_b[name]), (turn, name)
        transcript = prompt + a.outputs[0].token_ids


# --- under eviction: a long session stays bounded --------------------------------------------------


def test_a_100_turn_session_stays_within_its_budget_with_exact_pool_accounting(loaded):
    budget, chunk = 64, 32
    engine = Engine(loaded, policy="nexus", budget=budget, window=8, chunk=chunk, max_num_seqs=2,
                    max_model_len=16384)
    rng, transcript = random.Random(3), []
    for turn in range(100):
        prompt = transcript + new_tokens(rng, 1, 40)
        params = SamplingParams(max_tokens=rng.randrange(1, 8), **GREEDY)
        out = engine.generate(prompt, params, session_id="long", use_tqdm=False)[0]
        assert out.num_cached_tokens == max(len(transcript) - 1, 0)  # only the new tokens are prefilled
        transcript = prompt + out.outputs[0].token_ids
        info = engine.session("long")
        assert info.parked and info.num_ring_tokens == len(transcript) - 1
        pos = parked_ring(engine, "long")["pos"]  # [layers, slots, kv_heads]
        assert pos.shape[1] == min(budget, len(transcript) - 1)
        # Every (layer, head) holds distinct positions the stream has read, sinks and the last window included.
        for row in pos.transpose(1, 2).reshape(-1, pos.shape[1]):
            assert len(set(row.tolist())) == len(row) and row.max() < len(transcript) - 1
            assert set(range(4)) <= set(row.tolist())
            read = len(transcript) - 1
            assert set(range(max(read - 8, 0), read)) <= set(row.tolist())
        assert engine.attention.peak_slots_per_seq <= budget + chunk
        assert_pool_accounting(engine)
    assert len(transcript) > 1500  # far past the budget: the ring evicted all along
    engine.close_session("long")
    assert engine.pool.num_used == engine.pool.num_reserved == 0


# --- parked rings never block work ---------------------------------------------------------------


def test_admission_releases_the_least_recently_used_parked_ring_and_the_session_answers_from_history(loaded):
    per_block = Engine(loaded, policy="full", max_num_seqs=1, max_model_len=256).pool.bytes_per_block
    engine = Engine(loaded, policy="full", chunk=32, max_num_seqs=2, max_model_len=256, kv_memory=12 * per_block)
    fresh = Engine(loaded, policy="full", chunk=32, max_num_seqs=2, max_model_len=256)
    params = SamplingParams(max_tokens=8, **GREEDY)
    rng = random.Random(4)
    a, b = new_tokens(rng, 60, 61), new_tokens(rng, 60, 61)
    out_a = engine.generate(a, params, session_id="a", use_tqdm=False)[0]
    engine.generate(b, params, session_id="b", use_tqdm=False)
    assert engine.stats().num_parked_sessions == 2 and engine.stats().parked_kv_blocks == 10
    # A request needing 7 of the 12 blocks is admitted at once: "a", least recently used, is released.
    engine.add_request(new_tokens(rng, 100, 101), SamplingParams(max_tokens=12, **GREEDY))
    engine.step()
    assert engine.scheduler.num_running == 1
    assert not engine.session("a").parked and engine.session("b").parked
    assert engine.stats().sessions_released_by_pressure == 1
    while engine.has_unfinished_requests():
        engine.step()
    # "a" answers its next turn from its history: prefilled again, the same tokens as sent fresh.
    prompt = a + out_a.outputs[0].token_ids + new_tokens(rng, 10, 11)
    got = engine.generate(prompt, params, session_id="a", use_tqdm=False)[0]
    assert got.num_cached_tokens == 0 and engine.stats().session_misses == 1
    assert got.outputs[0].token_ids == fresh.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def test_parked_session_limits_release_the_oldest(loaded):
    engine = Engine(loaded, policy="full", chunk=32, max_num_seqs=2, max_model_len=512, max_parked_sessions=2)
    params = SamplingParams(max_tokens=2, **GREEDY)
    for name in "abc":
        engine.generate([5, 6, 7, 8], params, session_id=name, use_tqdm=False)
    assert [engine.session(n).parked for n in "abc"] == [False, True, True]
    assert engine.session("a").token_ids[:4] == [5, 6, 7, 8]  # the history stays
    small = Engine(loaded, policy="full", chunk=32, max_model_len=512, max_sessions=2)
    for name in "abc":
        small.generate([5, 6, 7], params, session_id=name, use_tqdm=False)
    assert small.session_ids() == ["b", "c"] and small.session("a") is None


def test_session_requests_are_checked(loaded):
    engine = Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_model_len=2048, positions="original")
    engine.generate([5, 6, 7], SamplingParams(max_tokens=2, kv_budget=40, **GREEDY), session_id="s", use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="kv_budget 40, fixed"):
        engine.add_request([5, 6, 7, 8], SamplingParams(kv_budget=50), session_id="s")
    rid = engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=2), session_id="s")
    with pytest.raises(InvalidRequestError, match="already has a request in flight"):
        engine.add_request([5, 6, 7, 8], SamplingParams(), session_id="s")
    with pytest.raises(InvalidRequestError, match="session_id too"):
        engine.add_request([5], SamplingParams(), append=True)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        engine.add_request([5], SamplingParams(prompt_logprobs=1), session_id="t")
    with pytest.raises(InvalidRequestError, match="session_id must be"):
        engine.add_request([5], SamplingParams(), session_id="")
    engine.abort(rid)
    engine.step()
    assert engine.session("s").request_id is None
    assert engine.session("s").kv_budget == 40
    with pytest.raises(InvalidRequestError, match="positions='original'"):  # a ring's RoPE positions are one mode's
        engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=2, positions="ring"), session_id="s")


# --- a random soak ----------------------------------------------------------------------------------


def test_random_soak_of_sessions_and_requests_never_shares_a_block_and_frees_everything(loaded, tmp_path,
                                                                                        monkeypatch):
    import minikv.session

    rng = random.Random(5)
    rolled_back = dict(evicted=0)
    roll_back = minikv.session.roll_back_ring

    def counted(*args):
        left = roll_back(*args)
        rolled_back["evicted"] += left is not None
        return left

    monkeypatch.setattr(minikv.session, "roll_back_ring", counted)
    per_block = Engine(loaded, budget=64, window=8, max_num_seqs=1).pool.bytes_per_block
    engine = Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_num_seqs=6, max_model_len=8192,
                    kv_memory=30 * per_block, max_parked_sessions=6)
    finished = set()
    added = 0
    saved: dict[str, str] = {}
    done = dict(closed=0, saved=0, restored=0, aborted_session_requests=0)
    while added < 250 or engine.has_unfinished_requests():
        if added < 250:
            for _ in range(rng.randrange(0, 3)):
                params = SamplingParams(max_tokens=rng.randrange(1, 8), temperature=rng.choice([0, 0.8]),
                                        ignore_eos=True)
                if rng.random() < 0.6:
                    sid = f"s{rng.randrange(8)}"
                    info = engine.session(sid)
                    if info is not None and info.request_id is not None:
                        continue
                    base = info.token_ids if info is not None else []
                    if base and rng.random() < 0.3:  # the last reply sent back changed: a rollback
                        base = base[: len(base) - rng.randrange(1, 8)]
                    engine.add_request(base + new_tokens(rng, 1, 30), params, session_id=sid)
                else:
                    engine.add_request(new_tokens(rng, 1, 80), params)
                added += 1
        action = rng.random()
        sessions = engine.session_ids()
        if sessions and action < 0.05:
            engine.close_session(rng.choice(sessions))
            done["closed"] += 1
        elif sessions and action < 0.10:
            sid = rng.choice(sessions)
            if engine.session(sid).request_id is None:
                saved[sid] = engine.save_session(sid, tmp_path)
                done["saved"] += 1
        elif saved and action < 0.15:
            sid = rng.choice(sorted(saved))
            info = engine.session(sid)
            if info is None or info.request_id is None:
                assert engine.restore_session(saved[sid]) == sid
                done["restored"] += 1
        elif engine.num_requests and action < 0.25:
            victim = engine._requests[rng.choice(list(engine._requests))]
            done["aborted_session_requests"] += victim.session is not None and not victim.is_finished
            engine.abort(victim.request_id)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished.add(out.request_id)
        assert_pool_accounting(engine)
    assert engine.stats().session_hits > 20 and engine.stats().sessions_released_by_pressure > 0
    assert rolled_back["evicted"] > 5, rolled_back  # rings that had evicted were rolled back, not started over
    assert min(done.values()) > 0, done
    for sid in engine.session_ids():
        engine.close_session(sid)
    pool = engine.pool
    assert pool.num_used == pool.num_reserved == 0 and all(pool.owner_of(b) == -1 for b in range(pool.num_blocks))
    assert engine.batch.num_free == engine.batch.max_num_seqs


# --- persistence --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,options,positions", [("nexus", {}, None), ("nestedkv", {}, None), ("full", {}, None),
                                                      ("nexus", {}, "ring")])
def test_a_saved_and_restored_session_has_a_bitwise_identical_ring_and_continues_alike(loaded, tmp_path, policy,
                                                                                    options, positions):
    kw = dict(policy=policy, chunk=32, max_num_seqs=2, max_model_len=4096, policy_options=options, positions=positions)
    if policy != "full":
        kw.update(budget=64, window=8)
    stays, restored = Engine(loaded, **kw), Engine(loaded, **kw)
    rng = random.Random(6)
    params = SamplingParams(max_tokens=6, **GREEDY)
    prompt = new_tokens(rng, 100, 101)
    stays.generate(prompt, params, session_id="conv/1", use_tqdm=False)
    path = stays.save_session("conv/1", tmp_path)
    assert restored.restore_session(path) == "conv/1"
    before, after = parked_ring(stays, "conv/1"), parked_ring(restored, "conv/1")
    assert before.keys() == after.keys() and "rope_pos" in before  # ranks under positions="ring"
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert restored.session("conv/1") == stays.session("conv/1")
    nxt = stays.session("conv/1").token_ids + new_tokens(rng, 20, 21)
    a = stays.generate(nxt, params, session_id="conv/1", use_tqdm=False)[0]
    b = restored.generate(nxt, params, session_id="conv/1", use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.num_cached_tokens == b.num_cached_tokens > 0


def test_session_files_from_elsewhere_or_damaged_are_refused_clearly(loaded, tmp_path):
    from tiny_engine import tiny_loaded

    engine = Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_model_len=4096)
    engine.generate(list(range(5, 60)), SamplingParams(max_tokens=4, **GREEDY), session_id="s", use_tqdm=False)
    path = engine.save_session("s", tmp_path / "ok")
    others = [
        (Engine(loaded, policy="h2o", budget=64, window=8, chunk=32, max_model_len=4096), "policy"),
        (Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_model_len=4096, block_size=8), "block_size"),
        (Engine(tiny_loaded(tmp_path / "other", seed=1), policy="nexus", budget=64, window=8, chunk=32,
                max_model_len=4096), "model"),
    ]
    for other, field in others:
        with pytest.raises(SessionFileError, match=f"saved with {field}"):
            other.restore_session(path)
        assert other.session("s") is None and other.pool.num_used == 0
    meta = json.loads(open(path).read())
    meta["identity"]["dtype"] = "float16"
    (tmp_path / "dtype").mkdir()
    (tmp_path / "dtype" / "s.json").write_text(json.dumps(meta))
    (tmp_path / "dtype" / "s.safetensors").write_bytes((tmp_path / "ok" / "s.safetensors").read_bytes())
    with pytest.raises(SessionFileError, match="saved with dtype 'float16'"):
        engine.restore_session(tmp_path / "dtype" / "s.json")
    meta = {**json.loads(open(path).read()), "version": 1}  # keys in Hugging Face's channel order
    (tmp_path / "dtype" / "s.json").write_text(json.dumps(meta))
    with pytest.raises(SessionFileError, match="version 1 minikv session file.*channel order"):
        engine.restore_session(tmp_path / "dtype" / "s.json")
    fresh = Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_model_len=4096)
    data = (tmp_path / "ok" / "s.safetensors").read_bytes()
    (tmp_path / "ok" / "s.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SessionFileError, match="checksum"):
        fresh.restore_session(path)
    (tmp_path / "ok" / "s.json").write_text(open(path).read()[:40])
    with pytest.raises(SessionFileError, match="not valid JSON"):
        fresh.restore_session(path)
    with pytest.raises(SessionFileError, match="cannot read"):
        fresh.restore_session(tmp_path / "missing.json")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SessionFileError, match="cannot save session 's'"):
        engine.save_session("s", tmp_path / "a-file" / "sub")
    assert fresh.session_ids() == [] and fresh.pool.num_used == 0


# --- the CLI chat keeps one session ----------------------------------------------------------------


def test_cli_chat_prefills_only_each_new_message(tmp_path, monkeypatch, capsys):
    import minikv.cli as cli
    from helpers import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "chat")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    lines = iter(["hello there", "and a second question", "/reset", "fresh start"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    engines, prompt_lengths = [], []
    build = cli.build_engine

    def build_and_keep(args, model):
        engine = build(args, model)
        add = engine.add_request

        def add_and_measure(*args, **kw):
            request_id = add(*args, **kw)
            prompt_lengths.append(len(engine._requests[request_id].prompt_ids))
            return request_id

        engine.add_request = add_and_measure
        engines.append(engine)
        return engine

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(cli.sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setattr(cli, "build_engine", build_and_keep)
    assert cli.main(["run", str(path), "--max-tokens", "4", "--temperature", "0"]) == 0
    stats = engines[0].stats()
    assert len(prompt_lengths) == 3 and stats.session_hits == 1 and stats.session_misses == 0
    # Turn 2 computed only what turn 1's ring had not read; /reset started the third turn over.
    assert stats.prompt_tokens == sum(prompt_lengths) - stats.session_reused_tokens
    assert stats.session_reused_tokens >= prompt_lengths[0]


# --- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_session_gives_the_tokens_of_the_conversation_sent_fresh(smollm2, one_torch_thread):
    """Each turn's conversation is rendered whole; the session keeps the ids its ring read (the generated
    ones, the stop token fed as the next turn's first token) and computes only the new message."""
    engine = Engine(smollm2, policy="full", chunk=256, max_num_seqs=2, max_model_len=2048)
    fresh = Engine(smollm2, policy="full", chunk=256, max_num_seqs=2, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [{"role": "user", "content": "Name a large city in France."}]
    questions = ["What river runs through it?", "Name one famous museum there.", "Thanks! One word to sum it up?"]
    transcript: list[int] = []
    for turn, question in enumerate(questions):
        got = engine.chat(messages, params, session_id="chat", use_tqdm=False)[0]
        want = fresh.generate(got.prompt_token_ids, params, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.prompt_token_ids[:len(transcript)] == transcript
        assert got.num_cached_tokens == max(len(transcript) - 1, 0)
        transcript = got.prompt_token_ids + got.outputs[0].token_ids
        messages = messages + [{"role": "assistant", "content": got.outputs[0].text},
                               {"role": "user", "content": question}]
    assert engine.stats().session_hits == 2


# --- the chat benchmark ------------------------------------------------------------------------------


def test_chat_bench_computes_only_new_tokens_with_sessions_and_everything_without(loaded, capsys):
    from minikv.bench_chat import run_chats, target_lines

    kw = dict(policy="nexus", budget=64, window=8, chunk=32, max_num_seqs=3, max_model_len=2048)
    load = dict(sessions=3, turns=4, user_len=20, gen_len=5)
    with_s = run_chats(Engine(loaded, **kw), **load, use_sessions=True)
    without = run_chats(Engine(loaded, **kw), **load, use_sessions=False)
    assert with_s.prompt_tokens_sent == without.prompt_tokens_sent == without.prompt_tokens_computed
    # Per session: 20 new user tokens a turn, plus the previous reply's last token from the second turn on.
    assert with_s.new_tokens == with_s.prompt_tokens_computed == 3 * (4 * 20 + 3)
    assert with_s.per_turn_computed == [60, 63, 63, 63]
    assert with_s.output_tokens == without.output_tokens == 3 * 4 * 5 and with_s.errors == without.errors == 0
    assert len(with_s.ttft_by_turn) == 4 and all(t > 0 for t in with_s.ttft_by_turn)
    assert any("computed with sessions = the new tokens only" in line and "(met)" in line
               for line in target_lines(with_s, without))


def test_bench_preset_chat_runs_from_the_command_line(tmp_path, capsys):
    from minikv import bench
    from tiny_engine import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "tiny")
    code = bench.main([str(path), "--preset", "chat", "--sessions", "2", "--turns", "3", "--user-len", "16",
                       "--gen-len", "4", "--budget", "64", "--window", "8", "--chunk", "32", "--threads", "1",
                       "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["sessions", "no sessions"]
    assert rows[0]["prompt_tokens_computed"] == rows[0]["new_tokens"] < rows[1]["prompt_tokens_computed"]


def test_the_no_session_row_at_chosen_turns_replays_the_sessions_rows_prompts(loaded, tmp_path, capsys):
    from minikv import bench
    from minikv.bench_chat import run_chats, run_turns_without_sessions
    from tiny_engine import tiny_checkpoint

    kw = dict(policy="full", chunk=32, max_num_seqs=2, max_model_len=2048)
    load = dict(sessions=2, turns=4, user_len=12, gen_len=4)
    with_s = run_chats(Engine(loaded, **kw), **load, use_sessions=True)
    without = run_chats(Engine(loaded, **kw), **load, use_sessions=False)
    some = run_turns_without_sessions(Engine(loaded, **kw), with_s.prompts_by_turn, [1, 3], gen_len=4)
    # Under `full` both rows see the same conversation: the chosen turns compute what the whole row did there.
    assert some.per_turn_computed == [without.per_turn_computed[0], 0, without.per_turn_computed[2], 0]
    assert some.prompt_tokens_sent == some.prompt_tokens_computed == sum(some.per_turn_computed)
    assert some.output_tokens == 2 * 2 * 4 and some.errors == 0
    assert some.ttft_by_turn[0] > 0 and some.ttft_by_turn[2] > 0
    assert some.ttft_by_turn[1] != some.ttft_by_turn[1] and some.ttft_by_turn[3] != some.ttft_by_turn[3]  # NaN
    path = tiny_checkpoint(tmp_path / "tiny")
    argv = [str(path), "--preset", "chat", "--sessions", "2", "--turns", "3", "--user-len", "16", "--gen-len", "4",
            "--budget", "64", "--window", "8", "--chunk", "32", "--threads", "1"]
    assert bench.main(argv + ["--no-session-turns", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[1]["label"] == "no sessions" and rows[1]["ttft_by_turn_ms"][:2] == [None, None]
    assert rows[1]["ttft_by_turn_ms"][2] > 0 and rows[1]["prompt_tokens_computed"] > rows[0]["prompt_tokens_computed"] / 3
    assert bench.main(argv + ["--no-session-turns", "3"]) == 0
    assert "target: turn 3 TTFT >= 5x lower" in capsys.readouterr().out
    for bad in ("0", "4", "2,x"):
        assert bench.main(argv + ["--no-session-turns", bad]) != 0
        assert "--no-session-turns" in capsys.readouterr().err
