#!/usr/bin/env python3
"""Write an F16 GGUF with microsoft/bitnet-b1.58-2B-4T's exact shapes and random ternary
weights, for the C++ peers' own quantizers (scripts/peers/build.sh).

Only speed is measured with it, so the values are random: every projection holds
{-1, 0, +1} * 0.03, the embedding is N(0, 0.02), norms are 1. The embedding is tied (no
`output.weight`), as in 2B-4T. The tokenizer is a dummy SentencePiece-style vocabulary of
128256 pieces, which is all llama-bench needs (it feeds random token ids).

The architecture is llama.cpp's `bitnet` (attn_sub_norm / ffn_sub_norm, gated FFN), the one
arch all three peers (llama.cpp, ik_llama.cpp, the 2024 bitnet.cpp fork) understand. Their
`bitnet` graph uses a SiLU gate where 2B-4T has ReLU^2; the matmul work is identical.

Needs `pip install gguf numpy`. Usage:
    make_gguf.py OUT.gguf [--arch bitnet] [--seed 0]
"""
import argparse
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("make_gguf.py: needs the gguf package (pip install gguf numpy)")

# bitnet-b1.58-2B-4T
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, CONTEXT = 2560, 30, 20, 5, 6912, 128256, 4096
ROPE_THETA, RMS_EPS, BOS, EOS = 500000.0, 1e-5, 128000, 128001


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", default="bitnet", help="general.architecture (default: bitnet)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    head_dim = HIDDEN // HEADS
    kv_dim = KV_HEADS * head_dim
    rng = np.random.default_rng(args.seed)

    def ternary(rows, cols):
        t = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)
        return t.astype(np.float16) * np.float16(0.03)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(args.out, args.arch)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)

    embd = rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32) * np.float32(0.02)
    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    del embd
    w.add_tensor("output_norm.weight", ones(HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(HIDDEN))
        w.add_tensor(p + "attn_sub_norm.weight", ones(HIDDEN))
        w.add_tensor(p + "ffn_norm.weight", ones(HIDDEN))
        w.add_tensor(p + "ffn_sub_norm.weight", ones(FFN))
        # GGUF shapes are numpy (rows = out_features, cols = in_features).
        w.add_tensor(p + "attn_q.weight", ternary(HIDDEN, HIDDEN))
        w.add_tensor(p + "attn_k.weight", ternary(kv_dim, HIDDEN))
        w.add_tensor(p + "attn_v.weight", ternary(kv_dim, HIDDEN))
        w.add_tensor(p + "attn_output.weight", ternary(HIDDEN, HIDDEN))
        w.add_tensor(p + "ffn_gate.weight", ternary(FFN, HIDDEN))
        w.add_tensor(p + "ffn_up.weight", ternary(FFN, HIDDEN))
        w.add_tensor(p + "ffn_down.weight", ternary(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
