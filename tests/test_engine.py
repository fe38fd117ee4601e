"""The Engine end to end on a tiny random Llama: batching, aborts, sampling parameters, bad input, failures."""

from __future__ import annotations

import copy
import dataclasses
import gc
import random

import pytest
import torch

from minikv.engine import Engine
from minikv.outputs import RequestOutput
from minikv.errors import InvalidRequestError
from minikv.loader import LoadedModel
from minikv.sampling import RequestOutputKind, SamplingParams, fold_seed

from helpers import hf_logits

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_engine(loaded, **kwargs) -> Engine:
    options = dict(policy="full", max_num_seqs=4, chunk=16, max_model_len=512)
    return Engine(loaded, **{**options, **kwargs})


def random_prompt(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [1] + [rng.randrange(3, 259) for _ in range(rng.randrange(lo, hi))]


def run_all(engine: Engine) -> dict[str, RequestOutput]:
    """Drive the engine to the end; every request must be reported finished exactly once."""
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final, "a finished request was reported twice"
                final[out.request_id] = out
    return final


def all_rings_free(engine: Engine) -> bool:
    return engine.pool.num_used == 0 and engine.pool.num_reserved == 0 and engine.num_requests == 0


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["full", "nexus"])
def test_outputs_are_identical_alone_and_in_a_changing_batch(loaded, policy):
    rng = random.Random(0)
    prompts = [random_prompt(rng, 5, 90) for _ in range(9)]
    options = dict(policy=policy, budget=48, window=8) if policy == "nexus" else {}
    alone = [make_engine(loaded, **options).generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    engine = make_engine(loaded, **options)
    ids, final = [], {}
    for prompt in prompts:  # one new request per step, while the earlier ones prefill and decode
        ids.append(engine.add_request(prompt, GREEDY))
        final.update({o.request_id: o for o in engine.step() if o.finished})
    final.update(run_all(engine))
    assert [final[rid].outputs[0].token_ids for rid in ids] == alone
    assert all_rings_free(engine)
    if policy == "nexus":
        assert any(final[rid].metrics.num_evicted_tokens > 0 for rid in ids)


@pytest.mark.parametrize("policy", ["nexus", "h2o"])
def test_evicting_outputs_do_not_depend_on_prompts_that_prefill_in_the_same_step(loaded, policy):
    """Six long prompts added at once, so that several prefill in one step: each is still cut at multiples
    of `chunk` (a chunk that does not fit waits whole), so each evicts at the same points as alone."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, 100, 600) for _ in range(6)]
    options = dict(policy=policy, budget=64, window=8, chunk=48, max_num_seqs=6, max_model_len=1024)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    alone = [make_engine(loaded, **options).generate([p], params, use_tqdm=False)[0] for p in prompts]
    together = make_engine(loaded, **options).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert all(o.metrics.num_evicted_tokens > 0 for o in together)


def test_step_plans_admit_new_requests_next_step_and_chunk_long_prompts_between_decodes(loaded):
    engine = make_engine(loaded, chunk=8, max_num_batched_tokens=10)
    plans = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        plans.append(([s.request_id for s in plan.decodes], [(c.req.request_id, c.length) for c in plan.prefills]))
        return plan

    engine.scheduler.schedule = recording_schedule
    engine.add_request([1, 5, 6], GREEDY, request_id="a")
    engine.add_request([1, 7], GREEDY, request_id="b")
    engine.step()
    engine.step()
    engine.add_request(list(range(3, 33)), GREEDY, request_id="long")  # 30 tokens > max_num_batched_tokens
    for _ in range(5):
        engine.step()
    assert plans == [([], [("a", 3), ("b", 2)]), (["a", "b"], []),
                     (["a", "b"], [("long", 8)]), (["a", "b"], [("long", 8)]), (["a", "b"], [("long", 8)]),
                     (["a", "b"], [("long", 6)]), (["a", "b", "long"], [])]


# --- aborts and the random soak -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["waiting", "prefilling", "decoding"])
def test_abort_frees_the_ring_at_once_and_is_reported_once(loaded, where):
    engine = make_engine(loaded, max_num_seqs=1, chunk=4, max_num_batched_tokens=4)
    other = engine.add_request([1, 2, 3], dataclasses.replace(GREEDY, max_tokens=3))
    target = engine.add_request(list(range(3, 15)), GREEDY)
    outputs = engine.step()  # `other` takes the only ring
    if where != "waiting":
        outputs += run_all_until(engine, lambda: engine.scheduler.running and
                                 engine.scheduler.running[0].request_id == target)
        if where == "decoding":
            outputs += run_all_until(engine, lambda: not engine.scheduler.running[0].is_prefilling)
    assert engine.batch.num_free == 0
    held = engine.pool.num_reserved
    engine.abort(target)
    assert engine.batch.num_free == (0 if where == "waiting" else 1)
    assert engine.pool.num_reserved == (held if where == "waiting" else 0)
    outputs += [o for _ in range(20) for o in engine.step()]
    finals = [o for o in outputs if o.finished]
    assert sorted(o.request_id for o in finals) == sorted([other, target])
    assert next(o for o in finals if o.request_id == target).outputs[0].finish_reason == "abort"
    assert all_rings_free(engine)


def run_all_until(engine: Engine, condition) -> list[RequestOutput]:
    outputs = []
    while not condition():
        outputs += engine.step()
    return outputs


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0, 0.7, 1.3]), top_k=rng.choice([0, 5, 50]),
                          top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]),
                          repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.choice([0.0, 0.5]),
                          frequency_penalty=rng.choice([0.0, 0.3]), max_tokens=rng.randrange(1, 12),
                          min_tokens=rng.choice([0, 1]), seed=rng.choice([None, rng.randrange(1 << 40)]),
                          stop=rng.choice([None, ["<w3"]]), logprobs=rng.choice([None, 2]),
                          kv_budget=rng.choice([None, 7, 14, 20]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_300_random_requests_with_aborts_and_bad_ones_lose_nothing_free_everything_and_hold_memory_flat(loaded):
    """The issue-16 soak: lengths up to 25x the budget, random sampling parameters and seeds, ~5% aborted at
    random steps, a few invalid requests mixed in. Each finishes exactly once, every block and slot comes
    back, and the process's resident memory stays within 64 MiB of where it was after the first 50 requests
    (a leak of a request's tokens, logits or KV would grow it with the count)."""
    rng = random.Random(1)
    budget = 20
    engine = Engine(loaded, policy="nexus", budget=budget, n_sink=2, window=4, max_num_seqs=6, chunk=64,
                    max_model_len=1024)
    added: list[str] = []
    refused = 0
    final = {}
    rss = []
    while len(added) < 300 or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4) if len(added) < 300 else 0):
            if rng.random() < 0.03:  # an invalid one: refused, and nothing of it stays
                with pytest.raises(InvalidRequestError):
                    engine.add_request(rng.choice(["", [10**6], [{"role": "nobody", "content": "x"}]]),
                                       rng.choice([None, SamplingParams(kv_budget=budget + 1)]))
                refused += 1
                continue
            long = rng.random() < 0.1
            prompt = random_prompt(rng, 20 * budget, 25 * budget) if long else random_prompt(rng, 0, 30)
            added.append(engine.add_request(prompt, random_params(rng)))
        if added and rng.random() < 0.05:
            engine.abort(rng.choice(added))
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final, "a finished request was reported twice"
                final[out.request_id] = out
        assert engine.batch.num_free + engine.scheduler.num_running == engine.batch.max_num_seqs
        assert engine.pool.num_reserved == sum(r.num_blocks_needed for r in engine.scheduler.running)
        if len(final) >= 50:
            rss.append(rss_bytes())
    assert set(final) == set(added) and refused > 0
    reasons = {o.outputs[0].finish_reason for o in final.values()}
    assert "abort" in reasons and "length" in reasons and "error" not in reasons
    assert any(o.metrics.num_evicted_tokens > 0 for o in final.values())
    assert all_rings_free(engine) and not engine._requests and not engine._outputs
    assert max(rss) - rss[0] < 64 * 2**20, f"resident memory grew by {(max(rss) - rss[0]) / 2**20:.0f} MiB"


# --- sampling parameters through the engine ---------------------------------------------------------


PROMPT = [1, 40, 80, 120, 160, 200]


def greedy_tokens(loaded, n: int = 12) -> list[int]:
    return make_engine(loaded).generate([PROMPT], dataclasses.replace(GREEDY, max_tokens=n), use_tqdm=False)[0].outputs[0].token_ids


def test_top_k_1_top_p_tiny_and_min_p_1_all_equal_greedy(loaded):
    greedy = greedy_tokens(loaded)
    engine = make_engine(loaded)
    sampled = dict(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3)
    filtered = [SamplingParams(top_k=1, **sampled), SamplingParams(top_p=1e-6, **sampled),
                SamplingParams(min_p=1.0, **sampled), SamplingParams(**sampled)]
    outs = engine.generate([PROMPT] * 4, filtered, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:3]] == [greedy] * 3
    assert outs[3].outputs[0].token_ids != greedy  # without a filter, temperature 1 does sample


def test_same_seed_same_sample_other_seed_other_sample(loaded):
    params = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=s) for s in (7, 7, 8)]
    first = make_engine(loaded).generate([PROMPT] * 3, params, use_tqdm=False)
    again = make_engine(loaded, seed=99).generate([[1, 9], PROMPT], [params[0], params[0]], use_tqdm=False)
    assert first[0].outputs[0].token_ids == first[1].outputs[0].token_ids == again[1].outputs[0].token_ids
    assert first[2].outputs[0].token_ids != first[0].outputs[0].token_ids
    # Without a request seed, the engine's seed decides: same engine seed, same samples.
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    a, b, c = (make_engine(loaded, seed=s).generate([PROMPT], unseeded, use_tqdm=False)[0].outputs[0].token_ids for s in (1, 1, 2))
    assert a == b != c


def text_of(loaded, n: int = 24) -> str:
    return make_engine(loaded).generate([PROMPT], dataclasses.replace(GREEDY, max_tokens=n), use_tqdm=False)[0].outputs[0].text


def test_stop_strings_end_the_text_and_are_trimmed_unless_asked(loaded):
    full = text_of(loaded)
    # A stop string that first occurs some way into the text (replacement characters may still change).
    cut = next(k for k in range(3, len(full) - 3) if full.find(full[k:k + 3]) == k and "\ufffd" not in full[k:k + 3])
    stop = full[cut:cut + 3]
    engine = make_engine(loaded)
    params = [dataclasses.replace(GREEDY, max_tokens=24, stop=["\x00never", stop]),
              dataclasses.replace(GREEDY, max_tokens=24, stop=stop, include_stop_str_in_output=True)]
    trimmed, kept = engine.generate([PROMPT, PROMPT], params, use_tqdm=False)
    assert trimmed.outputs[0].text == full[:cut] and trimmed.outputs[0].finish_reason == "stop"
    assert kept.outputs[0].text == full[:cut + len(stop)] and kept.outputs[0].finish_reason == "stop"
    assert len(trimmed.outputs[0].token_ids) < 24
    # Streaming holds back what could start a stop string, so no delta ever shows part of it.
    stream = engine.stream(PROMPT, params[0])
    assert "".join(stream) == full[:cut] and stream.output.outputs[0].finish_reason == "stop"


def test_stop_reason_names_the_stop_string_or_token(loaded):
    full, greedy = text_of(loaded), greedy_tokens(loaded)
    cut = next(k for k in range(3, len(full) - 3) if full.find(full[k:k + 3]) == k and "\ufffd" not in full[k:k + 3])
    i = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    engine = make_engine(loaded)
    by_string, by_token, by_length = engine.generate(
        [PROMPT] * 3, [dataclasses.replace(GREEDY, max_tokens=24, stop=full[cut:cut + 3]),
                       dataclasses.replace(GREEDY, stop_token_ids=[greedy[i]]), GREEDY], use_tqdm=False)
    assert by_string.outputs[0].stop_reason == full[cut:cut + 3]
    assert by_token.outputs[0].stop_reason == greedy[i]
    assert by_length.outputs[0].stop_reason is None and by_length.outputs[0].finish_reason == "length"


def test_a_stop_string_generated_before_min_tokens_is_ignored(loaded):
    """vLLM's rule: nothing before min_tokens can stop a request, so a stop string seen then is not matched
    later either (it used to stop the request at min_tokens with the text cut before what a stream had sent)."""
    full = text_of(loaded)
    engine = make_engine(loaded)
    first_text = engine.generate([PROMPT], dataclasses.replace(GREEDY, max_tokens=1), use_tqdm=False)[0].outputs[0].text
    stop = next(ch for ch in first_text if ch.strip() and ch != "\ufffd")
    # min_tokens=3: the third token's text is the first that may stop the request
    later = full.find(stop, len(text_of(loaded, 2)))
    params = dataclasses.replace(GREEDY, max_tokens=24, min_tokens=3, stop=stop)
    out = engine.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    streamed = "".join(engine.stream(PROMPT, params))
    expected = full[:later] if later >= 0 else full
    assert out.text == streamed == expected
    assert out.text.startswith(first_text) and len(out.token_ids) >= 3


def test_output_kinds_cumulative_delta_and_final_only(loaded):
    engine = make_engine(loaded)
    kinds = {kind: engine.add_request(PROMPT, dataclasses.replace(GREEDY, output_kind=kind))
             for kind in RequestOutputKind}
    seen: dict[str, list[RequestOutput]] = {rid: [] for rid in kinds.values()}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    full, greedy = text_of(loaded, 12), greedy_tokens(loaded)
    cumulative, delta, final = (seen[kinds[k]] for k in RequestOutputKind)
    assert [o.outputs[0].token_ids for o in cumulative] == [greedy[: n + 1] for n in range(12)]
    assert "".join(o.outputs[0].text for o in delta) == full
    assert sum((o.outputs[0].token_ids for o in delta), []) == greedy and len(delta) == 12
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == greedy
    assert all(o.finished == (i == len(outs) - 1) for outs in seen.values() for i, o in enumerate(outs))


def test_metrics_timestamps_are_ordered(loaded):
    out = make_engine(loaded).generate([PROMPT], GREEDY, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.num_generated_tokens == 12 and m.kv_budget > 0


def test_a_stop_string_produced_before_min_tokens_is_ignored_for_good(loaded):
    """vLLM's rule: stop strings are not looked for until min_tokens are out, and what came before is never
    searched later. (It used to be: the request then stopped at min_tokens and cut its text back past what a
    stream had already sent.)"""
    min_tokens = 4
    before, full = text_of(loaded, min_tokens - 1), text_of(loaded, 24)
    # A stop string produced before min_tokens that does not occur again.
    stop = next(piece for size in (1, 2, 3) for k in range(len(before) - size + 1)
                if "\ufffd" not in (piece := before[k:k + size]) and full.find(piece, len(before) - size + 1) < 0)
    params = dataclasses.replace(GREEDY, max_tokens=24, min_tokens=min_tokens, stop=stop)
    engine = make_engine(loaded)
    out = engine.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == full and out.finish_reason == "length" and len(out.token_ids) == 24
    stream = engine.stream(PROMPT, params)
    assert "".join(stream) == full and stream.output.outputs[0].text == full


def test_stop_token_ids_max_tokens_and_finish_reasons(loaded):
    greedy = greedy_tokens(loaded)
    i = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    engine = make_engine(loaded)
    stopped, short = engine.generate([PROMPT, PROMPT], [dataclasses.replace(GREEDY, stop_token_ids=[greedy[i]]),
                                                        dataclasses.replace(GREEDY, max_tokens=3)], use_tqdm=False)
    assert stopped.outputs[0].token_ids == greedy[: i + 1] and stopped.outputs[0].finish_reason == "stop"
    assert short.outputs[0].token_ids == greedy[:3] and short.outputs[0].finish_reason == "length"
    assert short.metrics.num_generated_tokens == 3 and len(short.prompt_token_ids) == len(PROMPT)


def test_eos_stops_unless_min_tokens_or_ignore_eos(loaded):
    first = greedy_tokens(loaded)[0]
    # A tokenizer whose EOS is the token greedy decoding picks first.
    eos_first = copy.copy(loaded.tokenizer)
    eos_first.eos_token_ids = {first}
    engine = make_engine(LoadedModel(loaded.model, loaded.config, eos_first, loaded.path))
    plain, at_least, ignoring = engine.generate(
        [PROMPT] * 3, [SamplingParams(temperature=0, max_tokens=8), SamplingParams(temperature=0, max_tokens=8, min_tokens=4),
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)], use_tqdm=False)
    assert plain.outputs[0].token_ids == [first] and plain.outputs[0].finish_reason == "stop"
    assert len(at_least.outputs[0].token_ids) >= 4 and first not in at_least.outputs[0].token_ids[:4]
    assert ignoring.outputs[0].token_ids == greedy_tokens(loaded, 8) and ignoring.outputs[0].finish_reason == "length"


def test_logprobs_have_the_asked_shape_and_the_models_values(loaded):
    params = dataclasses.replace(GREEDY, max_tokens=5, logprobs=3)
    out = make_engine(loaded).generate([PROMPT, [1, 2]], [params, GREEDY], use_tqdm=False)
    lp = out[0].outputs[0]
    assert out[1].outputs[0].logprobs is None and out[1].outputs[0].cumulative_logprob is None
    assert len(lp.logprobs) == 5
    reference = torch.log_softmax(hf_logits(loaded.path, PROMPT + lp.token_ids), dim=-1)[len(PROMPT) - 1:]
    for step, (token, top) in enumerate(zip(lp.token_ids, lp.logprobs)):
        expected = torch.topk(reference[step], 3)
        assert list(top) == expected.indices.tolist()  # greedy: the chosen token is the top one
        assert [entry.logprob for entry in top.values()] == pytest.approx(expected.values.tolist(), abs=1e-4)
        assert [entry.rank for entry in top.values()] == [1, 2, 3]
        assert top[token].logprob == pytest.approx(reference[step, token].item(), abs=1e-4)
    assert lp.cumulative_logprob == pytest.approx(sum(top[t].logprob for t, top in zip(lp.token_ids, lp.logprobs)))


def test_a_sampled_token_outside_the_top_logprobs_is_added_without_a_rank(loaded):
    params = SamplingParams(temperature=5.0, max_tokens=8, logprobs=1, seed=3)
    lp = make_engine(loaded).generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert all(token in top for token, top in zip(lp.token_ids, lp.logprobs))
    outside = [top for token, top in zip(lp.token_ids, lp.logprobs) if len(top) == 2]
    assert outside, "temperature 5 should sample some token that is not the most likely"
    assert all(top[token].rank is None for token, top in zip(lp.token_ids, lp.logprobs) if len(top) == 2)


def test_prompt_logprobs_are_the_models_next_token_logprobs(loaded):
    params = dataclasses.replace(GREEDY, max_tokens=1, prompt_logprobs=2)
    out = make_engine(loaded, chunk=4).generate([PROMPT], params, use_tqdm=False)[0]  # several chunks
    reference = torch.log_softmax(hf_logits(loaded.path, PROMPT), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry[PROMPT[i]].logprob == pytest.approx(reference[i - 1, PROMPT[i]].item(), abs=1e-4)
        assert len([e for e in entry.values() if e.rank is not None]) == 2


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=3.0), dict(presence_penalty=2.0),
                                     dict(frequency_penalty=1.5)])
def test_penalties_change_greedy_choices_as_defined(loaded, penalty):
    params = dataclasses.replace(GREEDY, max_tokens=12, **penalty)
    out = make_engine(loaded).generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out != greedy_tokens(loaded)
    logits = hf_logits(loaded.path, PROMPT + out)[len(PROMPT) - 1:]
    for step, token in enumerate(out):
        expected = penalised(logits[step], PROMPT, out[:step], **penalty)
        best = expected.max()
        assert expected[token] > best - 1e-4  # the engine's choice is the argmax of the penalised logits


def penalised(logits, prompt, output, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    logits = logits.clone()
    for t in set(prompt) | set(output):  # Keskar et al.: positive logits divided, negative multiplied
        logits[t] = logits[t] / repetition_penalty if logits[t] > 0 else logits[t] * repetition_penalty
    for t in set(output):  # OpenAI: once per token present, and once per occurrence
        logits[t] -= presence_penalty + frequency_penalty * output.count(t)
    return logits


def test_temperature_is_applied(loaded):
    cold = SamplingParams(temperature=1e-3, max_tokens=12, ignore_eos=True, seed=5)
    hot = SamplingParams(temperature=50.0, max_tokens=12, ignore_eos=True, seed=5)
    outs = make_engine(loaded).generate([PROMPT, PROMPT], [cold, hot], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == greedy_tokens(loaded)
    assert outs[1].outputs[0].token_ids != outs[0].outputs[0].token_ids


# --- bad input ----------------------------------------------------------------------------------


def mutated(**fields) -> SamplingParams:
    """Parameters made valid and then changed: the engine must check them again."""
    params = SamplingParams()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize("prompt, params, message", [
    ("", None, "empty"),
    ([], None, "prompt"),
    ([1, 99999], None, "vocabulary"),
    ([{"role": "wizard", "content": "hi"}], None, "role"),
    ([{"role": "user"}], None, "content"),
    ("hi", mutated(top_p=0.0), "top_p"),
    ("hi", mutated(top_p=1.5), "top_p"),
    ("hi", mutated(top_k=-2), "top_k"),
    ("hi", mutated(temperature=-0.5), "temperature"),
    ("hi", mutated(max_tokens=0), "max_tokens"),
    ("hi", mutated(stop=[f"s{i}" for i in range(33)]), "stop"),
    ("hi", mutated(stop_token_ids=[5000]), "vocabulary"),
    ("hi", mutated(max_tokens=10_000), "max_model_len"),
    ("hi", "not params", "SamplingParams"),
])
def test_bad_input_fails_that_request_only(loaded, prompt, params, message):
    engine = make_engine(loaded)
    good = engine.add_request(PROMPT, GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, params)
    final = run_all(engine)
    assert list(final) == [good] and final[good].outputs[0].token_ids == greedy_tokens(loaded)
    assert all_rings_free(engine)


def test_bad_sampling_params_are_refused_when_made():
    for fields in (dict(top_p=0), dict(top_k=-2), dict(temperature=-1), dict(max_tokens=0),
                   dict(stop=["x"] * 33)):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**fields)


def test_generate_refuses_a_bad_batch_whole_and_leaves_queued_requests_alone(loaded):
    engine = make_engine(loaded)
    queued = engine.add_request(PROMPT, GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt 1"):
        engine.generate(["fine", "", "fine too"], GREEDY, use_tqdm=False)
    assert engine.num_requests == 1
    assert list(run_all(engine)) == [queued]


def test_request_ids_are_unique(loaded):
    engine = make_engine(loaded)
    engine.add_request(PROMPT, GREEDY, request_id="0")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(PROMPT, GREEDY, request_id="0")
    auto = {engine.add_request(PROMPT, GREEDY) for _ in range(3)}
    assert "0" not in auto and len(auto) == 3
    run_all(engine)
    assert engine.add_request(PROMPT, GREEDY, request_id="0") == "0"  # a finished, reported id is free again


# --- failures inside the engine -------------------------------------------------------------------


def test_an_exception_in_one_requests_processing_fails_only_that_request(loaded):
    engine = make_engine(loaded)
    good = engine.add_request(PROMPT, GREEDY)
    bad = engine.add_request(PROMPT, GREEDY)

    def broken_append(token, logprobs=None):
        raise RuntimeError("detokeniser exploded")

    engine._requests[bad].append_token = broken_append
    final = run_all(engine)
    assert final[bad].outputs[0].finish_reason == "error" and "detokeniser exploded" in final[bad].error
    assert final[good].outputs[0].token_ids == greedy_tokens(loaded) and final[good].error is None
    assert all_rings_free(engine)


def test_a_sampler_failure_caused_by_one_row_fails_only_that_request(loaded):
    engine = make_engine(loaded)
    sampler = engine.sampler

    def picky_sampler(logits, batch):
        if (batch.seed == fold_seed(666)).any():
            raise ValueError("row 666 is cursed")
        return sampler(logits, batch)

    engine.sampler = picky_sampler
    ids = [engine.add_request(PROMPT, dataclasses.replace(GREEDY, seed=s)) for s in (1, 666, 2)]
    final = run_all(engine)
    assert [final[rid].outputs[0].finish_reason for rid in ids] == ["length", "error", "length"]
    assert final[ids[0]].outputs[0].token_ids == final[ids[2]].outputs[0].token_ids == greedy_tokens(loaded)
    assert all_rings_free(engine)


def test_a_failed_forward_pass_fails_its_batch_and_the_engine_serves_on(loaded):
    engine = make_engine(loaded)
    run = engine.runner.run
    calls = []

    def failing_once(sched):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device fell over")
        return run(sched)

    engine.runner.run = failing_once
    ids = [engine.add_request(PROMPT, GREEDY) for _ in range(2)]
    final = run_all(engine)
    assert all(final[rid].outputs[0].finish_reason == "error" and "device fell over" in final[rid].error for rid in ids)
    assert all_rings_free(engine)
    assert engine.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == greedy_tokens(loaded)


# --- generate, stream, chat ------------------------------------------------------------------------


def test_generate_keeps_the_outputs_of_requests_queued_with_add_request(loaded):
    engine = make_engine(loaded)
    queued = engine.add_request(PROMPT, dataclasses.replace(GREEDY, max_tokens=2))
    outs = engine.generate([[1, 50], [1, 60, 70]], dataclasses.replace(GREEDY, max_tokens=6), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    final = run_all(engine)
    assert list(final) == [queued] and final[queued].outputs[0].token_ids == greedy_tokens(loaded, 2)


def test_stream_yields_deltas_that_add_up_to_the_text(loaded):
    engine = make_engine(loaded)
    other = engine.add_request([1, 77], dataclasses.replace(GREEDY, max_tokens=3))
    stream = engine.stream(PROMPT, dataclasses.replace(GREEDY, max_tokens=24))
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == text_of(loaded) == stream.output.outputs[0].text
    assert stream.output.outputs[0].finish_reason == "length"
    assert list(run_all(engine)) == [other]  # the other request's output waited for its owner


def test_a_stream_left_early_in_a_with_block_or_closed_aborts_at_once(loaded):
    engine = make_engine(loaded)
    with engine.stream(PROMPT, dataclasses.replace(GREEDY, max_tokens=200)) as stream:
        for _ in stream:
            break
    assert all_rings_free(engine) and not engine._requests and not engine.has_unfinished_requests()

    stream = engine.stream(PROMPT, dataclasses.replace(GREEDY, max_tokens=200))
    next(stream)
    stream.close()
    assert all_rings_free(engine) and not engine._requests
    with pytest.raises(StopIteration):  # a closed stream ends cleanly, it does not reach into the engine
        next(stream)
    assert stream.output is None

    with pytest.raises(InvalidRequestError):  # bad input fails at the call, not at the first next()
        engine.stream("", GREEDY)


def test_an_abandoned_stream_runs_to_its_end_and_leaves_nothing_behind(loaded):
    """No __del__ magic: a stream dropped without close() keeps its request until it finishes by itself,
    then nothing of it stays in the engine and nothing of it reaches `step` callers."""
    engine = make_engine(loaded)
    abandoned = engine.stream(PROMPT, dataclasses.replace(GREEDY, max_tokens=6))
    next(abandoned)
    del abandoned
    gc.collect()
    assert engine.num_requests == 1  # still running: its lifetime is not tied to garbage collection
    other = engine.add_request([1, 77], dataclasses.replace(GREEDY, max_tokens=8))
    assert list(run_all(engine)) == [other]
    assert all_rings_free(engine) and not engine._requests and not engine._outputs


def test_an_output_queue_gets_its_requests_outputs_and_step_only_the_others(loaded):
    """One way out of a step: each output goes to its request's output_queue, or to step()'s result."""
    from collections import deque

    engine = make_engine(loaded)
    queue: deque[RequestOutput] = deque()
    followed = engine.add_request(PROMPT, dataclasses.replace(GREEDY, max_tokens=5), output_queue=queue)
    other = engine.add_request([1, 77], dataclasses.replace(GREEDY, max_tokens=3))
    stepped = [out for _ in range(3) for out in engine.step()]
    assert {out.request_id for out in stepped} == {other} and len(queue) == 3  # CUMULATIVE: one per step
    assert [len(out.outputs[0].token_ids) for out in queue] == [1, 2, 3]
    engine.abort(followed)  # its final output goes to its queue at once, and the engine forgets it
    assert queue[-1].finished and queue[-1].outputs[0].finish_reason == "abort" and followed not in engine._requests
    assert list(run_all(engine)) == []  # `other` finished in those three steps; nothing of `followed` comes here
    assert all_rings_free(engine) and not engine.has_unfinished_requests()


def test_a_streams_output_is_its_deltas_added_up_logprobs_included(loaded):
    engine = make_engine(loaded)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    whole = engine.generate([PROMPT], params, use_tqdm=False)[0]
    stream = engine.stream(PROMPT, params)
    assert "".join(stream) == whole.outputs[0].text
    got, want = stream.output.outputs[0], whole.outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.logprobs == want.logprobs and len(got.logprobs) == 10
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob)
    assert stream.output.prompt_logprobs == whole.prompt_logprobs and stream.output.finished


def test_chat_applies_the_template_and_generate_refuses_messages(loaded):
    engine = make_engine(loaded)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="Engine.chat"):
        engine.generate(messages, GREEDY, use_tqdm=False)
    out = engine.chat(messages, GREEDY, use_tqdm=False)[0]
    template = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt == template
    assert len(out.prompt_token_ids) == len(loaded.tokenizer.encode(template, add_special_tokens=False))
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


# --- logits processors ---------------------------------------------------------------------------


def test_logits_processors_see_the_raw_logits_and_can_force_tokens(loaded):
    """A processor that records, then one that forces a given continuation: the engine decodes the forced
    tokens one per step (teacher forcing), and the recorded logits are the model's own."""
    forced = [7, 300, 42, 42, 99]
    seen: list[torch.Tensor] = []

    def record(output_ids, logits):
        assert len(output_ids) == len(seen)
        seen.append(logits.clone())
        return logits

    def force(output_ids, logits):
        masked = torch.full_like(logits, float("-inf"))
        masked[forced[len(output_ids)]] = 0.0
        return masked

    params = SamplingParams(temperature=0.7, seed=1, max_tokens=len(forced), ignore_eos=True,
                            logits_processors=[record, force])
    out = make_engine(loaded, policy="nexus", budget=24, window=4, chunk=8).generate(
        [PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == forced
    reference = hf_logits(loaded.path, PROMPT + forced[:-1])[len(PROMPT) - 1:]
    torch.testing.assert_close(torch.stack(seen), reference, rtol=1e-4, atol=1e-4)


def test_a_non_callable_logits_processor_is_refused():
    with pytest.raises(InvalidRequestError, match="logits_processors"):
        SamplingParams(logits_processors=[1])


# --- what the rings hold ----------------------------------------------------------------------------


def test_kv_positions_full_cache_is_every_position(loaded):
    engine = make_engine(loaded)
    rid = engine.add_request([1] + list(range(3, 43)), GREEDY)
    with pytest.raises(InvalidRequestError, match="waiting for admission"):
        engine.kv_positions(rid)
    for _ in range(5):
        engine.step()
    pos = engine.kv_positions(rid)
    layers, kv_heads = loaded.config.num_layers, loaded.config.num_kv_heads
    # 3 prefill steps read the 41 prompt tokens (chunk 16) and sample one; 2 decode steps read 2 more
    assert pos.shape == (layers, kv_heads, 43) and pos.dtype == torch.int32
    assert torch.equal(pos.sort(-1).values, torch.arange(43, dtype=torch.int32).expand(layers, kv_heads, -1))
    run_all(engine)
    with pytest.raises(InvalidRequestError, match="not in the engine"):
        engine.kv_positions(rid)


@pytest.mark.parametrize("policy", ["nexus", "h2o"])
def test_kv_positions_under_eviction_hold_budget_distinct_past_positions(loaded, policy):
    engine = make_engine(loaded, policy=policy, budget=32, n_sink=2, window=8)
    rid = engine.add_request(random_prompt(random.Random(3), 100, 101), GREEDY)
    for _ in range(12):
        engine.step()
    pos = engine.kv_positions(rid)
    read = int(engine._requests[rid].num_processed)
    assert read > 32 and pos.shape[-1] == 32
    assert ((pos >= 0) & (pos < read)).all()
    assert all(len(set(row.tolist())) == 32 for row in pos.flatten(0, 1))
    assert (pos[..., None] == torch.arange(2)).any(-2).all()  # the sinks and the window are there
    assert (pos[..., None] == torch.arange(read - 8, read)).any(-2).all()


def test_nexus_reserve_marks_the_prompts_last_window_through_the_engine(loaded):
    """The model runner tells the policy which chunk ends the prompt: with reserve=1 every non-sink prompt
    token is held once the prompt is read, the last chunk's window (16..23) included."""
    engine = make_engine(loaded, policy="nexus", policy_options={"reserve": 1.0}, budget=48, n_sink=4, window=8)
    rid = engine.add_request(random_prompt(random.Random(5), 23, 24), GREEDY)
    req = engine._requests[rid]
    while req.num_processed < 24:
        engine.step()
    held = engine.pool.ring("held", req.blocks, 24).bool()
    pos = engine.kv_positions(rid)
    assert all(sorted(p[h].tolist()) == list(range(4, 24)) for p, h in zip(pos.flatten(0, 1), held.flatten(0, 1)))
    run_all(engine)
