"""The real SmolLM2-135M-Instruct against transformers on the same dequantised weights."""

import subprocess
import sys

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv.eval import generate as make_task, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(smollm2):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()


def test_logits_match_transformers_on_a_200_token_prompt(smollm2, hf_model):
    from helpers import ring_logits

    text = "The history of the printing press begins in the fifteenth century. " * 20
    ids = smollm2.tokenizer.encode(text)[:200]
    assert len(ids) == 200
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    got, _, _ = ring_logits(smollm2.model, smollm2.config, ids, prefill=[128, 64], budget=256, policy="nexus")
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
           "List three colours of the rainbow.", "Explain what a KV cache is in one sentence."]


def test_greedy_generation_matches_transformers(smollm2, hf_model):
    engine = Engine(smollm2, budget=1024, policy="nexus", max_num_seqs=5)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = engine.generate(chats, SamplingParams(temperature=0, max_tokens=32, min_tokens=32), use_tqdm=False)
    for chat, out in zip(chats, outputs):
        ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(chat), add_special_tokens=False)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert out.token_ids == ref[0, len(ids):].tolist()


def test_passkey_at_2000_tokens_streams_through_the_ring(smollm2):
    """A 2,000-token passkey prompt through chunked prefill (chunk 256): the full cache finds the key.

    Not asserted, because it does not hold: nexus (or any evicting policy) at budget 512 finding it.
    SmolLM2 splits the 7-digit value into 7 tokens that nothing attends to before the question arrives,
    so every query-agnostic policy loses a digit at 25% budget (see docs/quality.md).
    """
    sample = make_task("niah_single", smollm2.tokenizer, 2000, seed=1, haystack="repeated", depth=0.4)
    engine = Engine(smollm2, chunk=256, policy="full", max_num_seqs=1)
    out = engine.generate([[{"role": "user", "content": sample.prompt}]],
                          SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert out.num_prompt_tokens > 1900 and out.num_evicted_tokens == 0
    assert score(sample, out.text) == 1.0, (out.text, sample.answers)


def test_cli_answers_paris():
    run = subprocess.run([sys.executable, "-m", "minikv", "run", "--max-tokens", "24", "--temperature", "0",
                          "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
