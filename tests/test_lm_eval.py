"""lm-evaluation-harness, the real package, against a live `minikv serve` (the tiny model of tiny_engine.py).

A small task of each kind is written to local files (a YAML per task, the documents in a JSONL file, read
with `dataset_path: json`): multiple choice and rolling loglikelihood through `local-completions` (which
scores with `echo` + `logprobs` on token-id prompts), generation through `local-chat-completions`. Every
score lm-eval reports must equal what the Engine itself computes for the same token ids (its prompt
logprobs, to 1e-4), under `full` and under the evicting `nexus`, whose ring is smaller than the prompts.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from test_server import LiveServer  # noqa: E402
from tiny_engine import tiny_checkpoint  # noqa: E402

from minikv.engine import Engine  # noqa: E402
from minikv.loader import load_model  # noqa: E402
from minikv.sampling import SamplingParams  # noqa: E402
from minikv.server.app import create_app  # noqa: E402

MAX_MODEL_LEN = 512
ENGINES = {
    "full": dict(policy="full"),
    "nexus": dict(policy="nexus", budget=48, n_sink=4, window=16),  # prompts run to ~150 tokens: they evict
}

QUESTIONS = [
    {"question": "Which of these is a colour that the sky shows on a clear summer afternoon?",
     "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "A cat, a dog and a horse walk into a field; which of them usually says meow to the others?",
     "choices": [" the dog", " the cat", " the horse", " nobody"], "answer": 1},
    {"question": "Count with me: one, two, three, four, five, six, seven, eight, nine, and then comes",
     "choices": [" ten", " eleven"], "answer": 0},
]
PASSAGES = [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
            {"text": "Bounded memory means every sequence keeps at most a fixed number of keys and values."}]

TASKS = {
    "minikv_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "minikv_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity"}]},
    "minikv_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                   "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = tiny_checkpoint(root / "tiny")
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    data = {"minikv_mc": QUESTIONS, "minikv_rolling": PASSAGES, "minikv_gen": QUESTIONS}
    for name, fields in TASKS.items():
        rows = tasks_dir / f"{name}.jsonl"
        rows.write_text("".join(json.dumps(row) + "\n" for row in data[name]))
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows)}},
                "test_split": "test", **fields, "metadata": {"version": 1.0}}
        (tasks_dir / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return model_dir, loaded, TaskManager(include_path=str(tasks_dir))


def engine_for(loaded, policy: str) -> Engine:
    return Engine(loaded, chunk=32, max_num_seqs=4, max_model_len=MAX_MODEL_LEN, seed=0, **ENGINES[policy])


def prompt_loglikelihood(engine: Engine, context: list[int], continuation: list[int]) -> float:
    """The Engine's own log p(continuation | context), from its prompt logprobs."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    out = engine.generate([context + continuation], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(len(context), len(ids)))


def samples_by_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


@pytest.mark.parametrize("policy", list(ENGINES))
def test_lm_eval_scores_equal_the_engines_own_logprobs(setup, policy):
    model_dir, loaded, task_manager = setup
    live = LiveServer(create_app(engine_for(loaded, policy), model_name="tiny"))
    try:
        lm = get_model("local-completions").create_from_arg_obj({
            "base_url": live.url + "/v1/completions", "model": "tiny", "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface", "max_length": MAX_MODEL_LEN - 8, "num_concurrent": 1,
            "max_retries": 1})
        results = lm_eval.simple_evaluate(model=lm, tasks=["minikv_mc", "minikv_rolling"],
                                          task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    finally:
        live.close()
    reference = engine_for(loaded, policy)

    mc_samples = samples_by_doc(results, "minikv_mc")
    assert [len(sample["resps"]) for sample in mc_samples] == [len(q["choices"]) for q in QUESTIONS]
    for sample in mc_samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            context = context if isinstance(context, str) else context[0]
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            expected = prompt_loglikelihood(reference, context_ids, continuation_ids)
            assert response[0][0] == pytest.approx(expected, abs=1e-4), (context, continuation)
            evicting = ENGINES[policy].get("budget", MAX_MODEL_LEN) < len(context_ids) + len(continuation_ids)
            assert evicting == (policy == "nexus")

    assert len(samples_by_doc(results, "minikv_rolling")) == len(PASSAGES)
    for sample, passage in zip(samples_by_doc(results, "minikv_rolling"), PASSAGES):
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=lm.tok_encode(passage["text"]), prefix_token=lm.prefix_token_id,
            max_seq_len=lm.max_length - 1, context_len=1)]
        expected = sum(prompt_loglikelihood(reference, list(ctx), list(cont)) for ctx, cont in windows)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
        assert math.isfinite(expected) and expected < 0


@pytest.mark.parametrize("policy", list(ENGINES))
def test_lm_eval_generate_until_through_chat_completions(setup, policy):
    model_dir, loaded, task_manager = setup
    live = LiveServer(create_app(engine_for(loaded, policy), model_name="tiny"))
    try:
        lm = get_model("local-chat-completions").create_from_arg_obj({
            "base_url": live.url + "/v1/chat/completions", "model": "tiny", "num_concurrent": 1,
            "max_retries": 1})
        results = lm_eval.simple_evaluate(model=lm, tasks=["minikv_gen"], task_manager=task_manager,
                                          log_samples=True, apply_chat_template=True, bootstrap_iters=0)
    finally:
        live.close()
    reference = engine_for(loaded, policy)
    assert len(samples_by_doc(results, "minikv_gen")) == len(QUESTIONS)
    for sample, doc in zip(samples_by_doc(results, "minikv_gen"), QUESTIONS):
        params = SamplingParams(temperature=0, max_tokens=12, stop=["\n\n"])
        expected = reference.chat([{"role": "user", "content": doc["question"]}], params, use_tqdm=False)[0]
        assert sample["resps"][0][0] == expected.outputs[0].text
        assert expected.outputs[0].token_ids  # it generated something
