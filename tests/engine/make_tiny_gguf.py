#!/usr/bin/env python3
"""Write a tiny random-weight llama GGUF that llama.cpp (llama-cpp-python) can serve.

The model is meaningless on purpose: it exists so that a real engine runs a real forward pass per
token on a CPU in well under a millisecond. SPM vocabulary with the 256 byte tokens <0x00>..<0xFF>
that llama.cpp's SPM tokenizer needs, plus a few hundred word pieces.

usage: make_tiny_gguf.py OUT.gguf [--layers 2] [--dim 64] [--seed 0]
"""
import argparse

import numpy as np
from gguf import GGUFWriter, TokenType


def vocab():
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [
        TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(TokenType.BYTE)
    words = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["▁" + w for w in (
        "the a of to and in is it you that he was for on are with as his they be at one have this "
        "from or had by word but what some we can out other were all there when up use your how "
        "said an each she which do their time if will way about many then them write would like "
        "so these her long make thing see him two has look more day could go come did number sound "
        "no most people my over know water than call first who may down side been now find token "
        "model server probe latency stream").split()]
    for i, w in enumerate(words):
        tokens.append(w)
        scores.append(-float(i))
        types.append(TokenType.NORMAL)
    return tokens, scores, types


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    tokens, scores, types = vocab()
    n_vocab, dim, ff, heads = len(tokens), a.dim, a.dim * 2, 4

    w = GGUFWriter(a.out, "llama")
    w.add_name("llm-probe-tiny-llama")
    w.add_context_length(2048)
    w.add_embedding_length(dim)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def t(name, *shape, scale=0.2):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", n_vocab, dim)
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    out = (rng.standard_normal((n_vocab, dim)) * 0.2).astype(np.float32)
    # </s> gets logit 0 while the others spread over ~N(0, 1.6): it is (almost) never the best
    # token, so streams run to max_tokens.
    out[2, :] = 0.0
    w.add_tensor("output.weight", out)
    for i in range(a.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(dim, dtype=np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(p + n + ".weight", dim, dim)
        t(p + "ffn_gate.weight", ff, dim)
        t(p + "ffn_up.weight", ff, dim)
        t(p + "ffn_down.weight", dim, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: llama, {a.layers} layers, dim {dim}, vocab {n_vocab}")


if __name__ == "__main__":
    main()
