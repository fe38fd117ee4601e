"""Test helpers: tiny random checkpoints written as safetensors, and a direct path to full logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5)


def make_tiny_checkpoint(path: Path, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> Path:
    """A random HF checkpoint of `arch` (transformers writes it), plus a byte-level tokenizer.json."""
    import transformers

    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
               "Qwen2ForCausalLM": transformers.Qwen2Config, "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    fields = {**TINY, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    if arch == "Qwen3ForCausalLM":
        fields.setdefault("head_dim", 32)
    config = cfg_cls(**fields)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random init is too tame: make attention sharp enough to matter
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path, config.vocab_size)
    return path


def write_byte_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE with no merges: ids 0-2 special, 3.. the 256 bytes; enough to round-trip any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                            AddedToken("</s>", special=True)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load_tiny(path: Path, dtype=torch.float32):
    from minikv.loader import build_model, load_state_dict, read_config, weight_files

    config = read_config(path)
    return build_model(config, load_state_dict(weight_files(path)), "cpu", dtype), config


class RingState:
    """What one ring holds after a run, read back in ring order: pos / score / k / v / edge_* / held as
    [layers, kv_heads, slots, ...] (slots = the ring's budget, or fewer when it never filled)."""

    def __init__(self, pool, blocks: list[int], length: int):
        self.pool, self.blocks, self.length = pool, blocks, length

    def __getattr__(self, name):
        if name in ("k", "v", "pos", "score", "edge_slot", "edge_pos", "edge_w", "held"):
            return self.pool.ring(name, self.blocks, self.length)
        raise AttributeError(name)


def ring_logits(model, config, ids: list[int], *, prefill: list[int], budget: int, policy="full",
                seed: int = 0, on_step=None, last: int | None = None, block_size: int = 16, **policy_options):
    """Logits of every position: the prompt in the given prefill chunk sizes, the rest decoded one by one,
    straight through RingAttention (no scheduler), so a test sees exactly what the ring does. The ring's
    blocks are scattered over the pool in reverse order, so a test also exercises the block table.
    `on_step(tokens_so_far, ring)` runs after each chunk and decode step. `last`: only the logits of the
    last `last` positions (the lm_head over every row of a long prompt costs more than the model).
    Returns (logits [len(ids) or last, vocab], the ring's RingState after the run, the RingAttention)."""
    from minikv.attention import PrefillSegment, RingAttention, StepPlan
    from minikv.block_pool import KVPool
    from minikv.policies import make_policy

    policy = make_policy(policy, **policy_options)
    num_blocks = -(-budget // block_size)
    pool = KVPool(config, num_blocks + 2, block_size, dtype=next(model.parameters()).dtype, device="cpu",
                  edges_per_slot=policy.top_m)
    attention = RingAttention(pool, policy, scale=config.head_dim**-0.5, seed=seed, num_slots=1, max_budget=budget)
    blocks = list(range(num_blocks + 1, 1, -1))  # out of order, and not starting at block 0
    table = torch.tensor(blocks, dtype=torch.int32)
    ring = RingState(pool, blocks, 0)
    logits, done = [], 0
    with torch.inference_mode():
        for length in prefill:
            plan = StepPlan(prefills=[PrefillSegment(0, 0, length, min(done, budget), done, budget, table,
                                                     ends_prompt=done + length == sum(prefill))])
            hidden = _forward(model, attention, plan, ids[done:done + length], range(done, done + length))
            if last is not None:  # keep the rows at positions >= len(ids) - last
                hidden = hidden[max(0, len(ids) - last - done):]
            logits.append(model.compute_logits(hidden))
            done += length
            ring.length = min(done, budget)
            if on_step:
                on_step(done, ring)
        for t in range(done, len(ids)):
            as_i32 = lambda x: torch.tensor([x], dtype=torch.int32)  # noqa: E731
            plan = StepPlan(num_decode=1, decode_slots=torch.tensor([0]), decode_tables=table[None],
                            decode_filled=as_i32(min(t, budget)), decode_budget=as_i32(budget), decode_pos=as_i32(t))
            logits.append(model.compute_logits(_forward(model, attention, plan, [ids[t]], [t])))
            ring.length = min(t + 1, budget)
            if on_step:
                on_step(t + 1, ring)
    logits = torch.cat(logits)
    return (logits if last is None else logits[len(logits) - last:]), ring, attention


def _forward(model, attention, plan, ids, positions):
    """One forward with the same step hooks the model runner calls (policies like epikv rely on them)."""
    attention.begin_step(plan)
    layer_inputs = [] if attention.policy.needs_hidden_states else None
    hidden = model(torch.tensor(list(ids)), torch.tensor(list(positions)), attention, layer_inputs)
    attention.end_step(layer_inputs)
    return hidden
