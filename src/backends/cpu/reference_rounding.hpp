// The rounding that is part of DeepSeek's reference model (dsv4-model.md §3.5), used in the `reference` numerics
// mode; the `exact` mode skips all of it. Each function rounds fp32 values in place to what the reference stores.
//  - fp8 blocks: s = 2^ceil(log2(max(amax, 1e-4) / 448)), x → bf16(e4m3_rne(clamp(x/s, ±448)) · s)
//  - fp4 blocks: s = 2^ceil(log2(max(amax, 6·2^-126) / 6)), x → bf16(e2m1_rne(x/s) · s)
//  - the Sylvester Hadamard matrix of the indexer head size / √size (128×128 in the real models), applied before
//    the indexer's fp4 rounding (DeepSeek rotates by the Hadamard of the vector's own length).
#pragma once

#include <cstdint>

namespace dsv4::cpu {

// Rounds x[0, n) through fp8 e4m3 with one ue8m0 scale per `block` values (the last block may be shorter).
void round_fp8_blocks_ue8m0(float* x, int64_t n, int64_t block);

// Rounds x[0, n) through fp4 e2m1 with one ue8m0 scale per `block` values (the last block may be shorter).
void round_fp4_blocks_ue8m0(float* x, int64_t n, int64_t block);

// x ← H x / √n for the n×n Sylvester-order Hadamard matrix H (H[i][j] = (−1)^popcount(i & j)), fp32;
// n must be a power of two.
void hadamard_transform(float* x, int64_t n);

// A stored KV vector [head_dim]: dims [0, head_dim − rope_dim) through fp8 in blocks of 64, the rope dims
// through bf16 (the 584-byte fp8 cache layout for head_dim 512, rope_dim 64). rows vectors of head_dim each.
void round_kv_reference(float* kv, int64_t rows, int64_t head_dim, int64_t rope_dim);

// Indexer q heads or keys [rows, head_dim]: Hadamard rotation, bf16, then fp4 in blocks of 32.
void round_indexer_reference(float* x, int64_t rows, int64_t head_dim);

}  // namespace dsv4::cpu
