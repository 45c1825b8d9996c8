"""Write a tiny random Llama as a GGUF file (float32 tensors, a 64-token SentencePiece-style vocabulary), the way
llama.cpp lays one out, so GGUF loading is tested without a download. Needs the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, HIDDEN, MLP, BLOCKS, HEADS, KV_HEADS = 64, 32, 64, 2, 4, 2


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    letters = [chr(ord("a") + i) for i in range(26)]
    tokens = ["<unk>", "<s>", "</s>", *letters, *("▁" + c for c in letters)]
    tokens += [f"<0x{i:02X}>" for i in range(VOCAB - len(tokens))]  # byte fallback for everything else
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    # token types: 2 unknown, 3 control, 1 normal, 6 byte
    writer.add_token_types([2, 3, 3] + [1] * (2 * len(letters)) + [6] * (VOCAB - 3 - 2 * len(letters)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", VOCAB, HIDDEN)
    kv = HIDDEN * KV_HEADS // HEADS
    for b in range(BLOCKS):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{b}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{b}.attn_k.weight", kv, HIDDEN)
        tensor(f"blk.{b}.attn_v.weight", kv, HIDDEN)
        tensor(f"blk.{b}.attn_output.weight", HIDDEN, HIDDEN)
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{b}.ffn_gate.weight", MLP, HIDDEN)
        tensor(f"blk.{b}.ffn_up.weight", MLP, HIDDEN)
        tensor(f"blk.{b}.ffn_down.weight", HIDDEN, MLP)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    tensor("output.weight", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
