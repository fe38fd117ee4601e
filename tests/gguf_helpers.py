"""Shared pieces for the GGUF and tokenizer tests: tiny synthetic GGUF files and cached reference objects.

Loading transformers' GGUF tokenizer costs seconds, so it is built once per test session here
(lru_cache) and shared by test_gguf.py and test_tokenizer.py.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_LAYERS, TINY_FFN = 16, 4, 2, 2, 24
TINY_HEAD_DIM = TINY_HIDDEN // TINY_HEADS


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character spelling, taken from transformers so the test does not reuse minikv's."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Special tokens, the 256 byte tokens and two merges ("Ġt", "Ġth")."""
    tokens = TINY_SPECIALS + byte_alphabet() + ["Ġt", "Ġth"]
    token_types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    merges = ["Ġ t", "Ġt h"]
    return tokens, token_types, merges


# A Llama-2-style SentencePiece vocabulary: <unk>, <s>, </s>, a control token mid-vocabulary like Mistral's
# [INST], the 256 <0xNN> byte tokens, merged pieces best first, then single characters (the worst scores).
SPM_PIECES = [
    "▁t", "he", "▁the", "in", "▁a", "er", "on", "▁s", "▁w", "at", "▁o", "en", "re", "is", "▁i", "▁c", "ing",
    "▁b", "or", "an", "▁f", "ou", "▁h", "it", "▁d", "▁is", "▁▁", "▁▁▁▁", "ll", "▁he", "llo", "▁hello", "▁q",
    "ui", "▁qu", "ck", "ick", "▁quick", "ro", "▁bro", "wn", "▁brown", "ox", "▁fox", "▁an", "▁and", "▁of", "ed",
    "es", "▁j", "um", "ps", "▁jum", "▁jumps", "▁l", "az", "▁laz", "▁lazy", "▁do", "▁dog", "▁▁▁", "'s", "▁it",
]
SPM_CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'!?:;-()=*<>[]{}#/\\\"_+é")


def tiny_spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """Tokens, llama.cpp token types and scores of a SentencePiece ("llama") vocabulary.

    Every merged piece can be cut into two earlier tokens, as a trained vocabulary's can.
    """
    tokens = ["<unk>", "<s>", "</s>", "[INST]"] + [f"<0x{b:02X}>" for b in range(256)]
    token_types = [2, 3, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(SPM_PIECES + SPM_CHARS):
        tokens.append(piece)
        token_types.append(1)
        scores.append(-float(rank))
    known = set(tokens)
    for piece in SPM_PIECES:
        assert any(piece[:cut] in known and piece[cut:] in known for cut in range(1, len(piece))), piece
    assert len(set(tokens)) == len(tokens)
    return tokens, token_types, scores


def train_sentencepiece(text_lines: list[str], vocab_size: int = 800, add_dummy_prefix: bool = True):
    """A SentencePiece BPE model trained on `text_lines` with Llama 2's settings (byte fallback, identity
    normalisation, whitespace kept, digits split); returns the `sentencepiece` processor."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text_lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2, minloglevel=2, num_threads=1)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def write_sentencepiece_gguf(path: pathlib.Path, processor, add_space_prefix: bool = True) -> pathlib.Path:
    """A GGUF holding `processor`'s vocabulary as llama.cpp's convert_hf_to_gguf.py writes one (pieces,
    scores, token types, special ids), with a one-layer model: enough to build the tokenizer."""
    import gguf

    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        types.append(2 if processor.is_unknown(i) else 3 if processor.is_control(i) else
                     5 if processor.is_unused(i) else 6 if processor.is_byte(i) else 1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(TINY_HIDDEN)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                           original_context: int) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's convert_hf_to_gguf.py writes for Llama 3.1 rope scaling: per
    frequency, the divisor of its inverse frequency (1 for short wavelengths, `factor` for long ones)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for freq in inv_freq:
        wavelength = 2 * np.pi / freq
        if wavelength < original_context / high:
            factors.append(1.0)
        elif wavelength > original_context / low:
            factors.append(factor)
        else:
            smooth = (original_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The permutation llama.cpp's convert_hf_to_gguf.py applies to Llama Q/K rows (forward direction)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_hf_weights(seed: int = 0, vocab: int | None = None, hidden: int = TINY_HIDDEN) -> dict[str, np.ndarray]:
    """Random fp32 weights for a 2-layer Llama in Hugging Face names and layout (the byte-level vocabulary's
    size unless `vocab` is given; TINY_HEADS heads of hidden / TINY_HEADS channels)."""
    rng = np.random.default_rng(seed)
    vocab = len(tiny_vocab()[0]) if vocab is None else vocab
    kv_rows = TINY_KV_HEADS * (hidden // TINY_HEADS)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    for i in range(TINY_LAYERS):
        prefix = f"model.layers.{i}."
        weights[prefix + "input_layernorm.weight"] = rand(hidden)
        weights[prefix + "post_attention_layernorm.weight"] = rand(hidden)
        weights[prefix + "self_attn.q_proj.weight"] = rand(hidden, hidden)
        weights[prefix + "self_attn.k_proj.weight"] = rand(kv_rows, hidden)
        weights[prefix + "self_attn.v_proj.weight"] = rand(kv_rows, hidden)
        weights[prefix + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        weights[prefix + "mlp.gate_proj.weight"] = rand(TINY_FFN, hidden)
        weights[prefix + "mlp.up_proj.weight"] = rand(TINY_FFN, hidden)
        weights[prefix + "mlp.down_proj.weight"] = rand(hidden, TINY_FFN)
    return weights


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def write_tiny_gguf(
    path: pathlib.Path,
    weights: dict[str, np.ndarray] | None = None,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    tokenizer_pre: str = "smollm",
    int32_tensor: str | None = None,
    chat_template: str | None = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    rope_freqs: np.ndarray | None = None,
    name: str | None = None,
    sliding_window: int | None = None,
) -> pathlib.Path:
    """Write a 2-layer Llama GGUF the way llama.cpp's converter would (Q/K rows permuted, F32 tensors).

    `tokenizer_model="llama"` writes the SentencePiece vocabulary of `tiny_spm_vocab` (the weights must
    then have its size), else the byte-level one of `tiny_vocab`. `int32_tensor` stores that Hugging Face
    tensor as I32, a type minikv refuses to dequantise. `rope_freqs` is written as Llama 3.1's per-frequency
    rope factors tensor.
    """
    import gguf

    weights = tiny_hf_weights() if weights is None else weights
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(weights["model.embed_tokens.weight"].shape[1])
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(tokenizer_model)
    if tokenizer_model == "llama":
        tokens, token_types, scores = tiny_spm_vocab()
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
    else:
        tokens, token_types, merges = tiny_vocab()
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_add_bos_token(False)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for hf_name, value in weights.items():
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, TINY_HEADS)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, TINY_KV_HEADS)
        if hf_name == int32_tensor:
            value = value.astype(np.int32)
        writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(value))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.ascontiguousarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@functools.lru_cache(maxsize=None)
def smollm_gguf_path() -> pathlib.Path:
    from minikv.gguf import find_default_gguf

    return find_default_gguf()


@functools.lru_cache(maxsize=None)
def transformers_gguf_tokenizer():
    """The tokenizer transformers builds from the SmolLM2 GGUF (the oracle; takes a few seconds)."""
    from transformers import AutoTokenizer

    path = smollm_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@functools.lru_cache(maxsize=None)
def smollm_checkpoint_without_weights():
    from minikv.gguf import load_gguf

    return load_gguf(smollm_gguf_path(), with_weights=False)


@functools.lru_cache(maxsize=None)
def smollm_tokenizer():
    from minikv.tokenizer import Tokenizer

    checkpoint = smollm_checkpoint_without_weights()
    return Tokenizer.from_files(
        checkpoint.tokenizer_json, checkpoint.tokenizer_config, checkpoint.generation_config, checkpoint.config
    )
