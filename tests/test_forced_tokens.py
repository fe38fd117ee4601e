"""SamplingParams.forced_token_ids: teacher forcing through the decode path, on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv.errors import InvalidRequestError

PROMPT = [5, 17, 200, 33, 90, 12, 250, 7]
FORCED = [7, 300, 42, 42, 99, 2, 150]  # 2 is the tiny model's EOS: forced, it must not stop the request


def _engine(loaded, policy="full", **kwargs):
    return Engine(loaded, budget=256, chunk=16, policy=policy, n_sink=2, window=8, max_num_seqs=4, **kwargs)


def test_forced_tokens_come_out_exactly_then_greedy_continues_as_from_the_longer_prompt(loaded):
    forced = _engine(loaded).generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(FORCED) + 6,
                                                             forced_token_ids=FORCED, ignore_eos=True),
                                      use_tqdm=False)[0]
    plain = _engine(loaded).generate(PROMPT + FORCED, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                     use_tqdm=False)[0]
    assert forced.outputs[0].token_ids[:len(FORCED)] == FORCED
    assert forced.outputs[0].token_ids[len(FORCED):] == plain.outputs[0].token_ids


def test_forced_tokens_run_through_decode_steps_not_prefill(loaded):
    engine = _engine(loaded)
    engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(FORCED), forced_token_ids=FORCED),
                    use_tqdm=False)
    stats = engine.stats()
    assert stats.prompt_tokens == len(PROMPT)  # nothing of the forced part was prefilled
    assert stats.generation_tokens == len(FORCED)
    assert stats.num_steps == len(FORCED)  # one prefill step emits the first forced token, a decode step each other


def test_forced_part_ignores_eos_and_stop_strings_and_counts_towards_max_tokens(loaded):
    text = loaded.tokenizer.decode(FORCED[:3])
    out = _engine(loaded).generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(FORCED),
                                                          forced_token_ids=FORCED, stop=[text], stop_token_ids=[42]),
                                   use_tqdm=False)[0].outputs[0]
    assert out.token_ids == FORCED and out.finish_reason == "length"


def test_logprobs_and_processors_see_the_models_distribution_not_the_forced_one(loaded):
    seen = []

    def record(output_ids, logits):
        seen.append(torch.log_softmax(logits, -1)[FORCED[len(output_ids)]].item())
        return logits

    out = _engine(loaded).generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(FORCED), logprobs=0,
                                                          forced_token_ids=FORCED, logits_processors=[record]),
                                   use_tqdm=False)[0].outputs[0]
    chosen = [entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)]
    assert chosen == pytest.approx(seen, abs=1e-5)
    assert all(lp < -1e-3 for lp in chosen)  # a random model is never sure of these: not a forced one-hot


def test_forced_tokens_under_an_evicting_policy_are_decoded_into_the_bounded_ring(loaded):
    forced = list(range(3, 3 + 40))  # 8 + 40 tokens through a 24-slot ring
    engine = Engine(loaded, budget=24, chunk=16, policy="streaming", n_sink=2, window=8, max_num_seqs=2)
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(forced), forced_token_ids=forced),
                          use_tqdm=False)[0]
    assert out.outputs[0].token_ids == forced
    assert engine.stats().evicted_tokens > 0


@pytest.mark.parametrize("ids, message", [([1, -1], "non-negative"), ([1, True], "non-negative"),
                                          ("abc", "list of token ids"), ([1] * 5, "at most max_tokens")])
def test_bad_forced_token_ids_are_refused(ids, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(max_tokens=4, forced_token_ids=ids)


def test_forced_ids_outside_the_vocabulary_are_refused_when_added(loaded):
    with pytest.raises(InvalidRequestError, match="forced_token_ids .* outside the vocabulary"):
        _engine(loaded).add_request(PROMPT, SamplingParams(max_tokens=4, forced_token_ids=[1, 384]))
