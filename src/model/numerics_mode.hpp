// The numerics of dsv4-model.md §3.5, and the CUDA backend's.
//  Exact:     fp32 activations and caches, no training-time rounding: matches HuggingFace transformers in fp32.
//  Reference: DeepSeek's rounding: stored KV through fp8 (ue8m0 per 64 dims, rope dims bf16), indexer q and keys
//             through Hadamard + fp4, residual streams and pooled compressor entries in bf16.
//  GpuBf16:   Exact plus the bf16 roundings the CUDA kernels apply in their exact mode (linear-layer inputs, F32
//             weights, KV entries, indexer q and keys, attention q, softmax weights and output, the experts' inputs):
//             a CPU model whose logits the GPU's match to fp32 summation order. A test and diagnostic mode; the
//             CUDA backend runs it as its exact mode.
#pragma once

#include <optional>
#include <string_view>

namespace dsv4 {

enum class NumericsMode { Exact, Reference, GpuBf16 };

std::string_view to_string(NumericsMode mode);
std::optional<NumericsMode> parse_numerics_mode(std::string_view text);

}  // namespace dsv4
