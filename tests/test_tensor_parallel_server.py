"""The server's core cases rerun on an engine of two tensor-parallel ranks (CPU, gloo).

The tests are test_server's own, imported: they collect here with this module's `server` fixture, whose
engine runs the tiny Llama (4 heads, 2 KV heads, vocab 384) split over two ranks. The server runs the
engine on its background thread, so the ranks' collectives run there too.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from test_server import (  # noqa: E402,F401  (fixtures and tests collected here at N=2)
    MODEL,
    LiveServer,
    client,
    test_completion_reports_usage_and_kv_accounting,
    test_logprobs_in_openai_shapes,
    test_models_and_health,
    test_seed_reproducibility,
    test_streamed_chat_concatenates_to_the_plain_answer,
    tiny_engine,
)

from minikv import SamplingParams  # noqa: E402
from minikv.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def engine(loaded):
    engine = tiny_engine(loaded.path, tensor_parallel_size=2, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, model_name=MODEL, max_waiting=64))
    yield live
    live.close()


def test_greedy_completion_equals_one_rank(loaded, client):
    prompt = "the quick brown fox jumps over the lazy dog " * 3  # longer than the budget: eviction
    reference = tiny_engine(loaded).generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                             use_tqdm=False)[0].outputs[0].text
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference
