// The two numerics of dsv4-model.md §3.5.
//  Exact:     fp32 activations and caches, no training-time rounding: matches HuggingFace transformers in fp32.
//  Reference: DeepSeek's rounding: stored KV through fp8 (ue8m0 per 64 dims, rope dims bf16), indexer q and keys
//             through Hadamard + fp4, residual streams and pooled compressor entries in bf16.
#pragma once

#include <optional>
#include <string_view>

namespace dsv4 {

enum class NumericsMode { Exact, Reference };

std::string_view to_string(NumericsMode mode);
std::optional<NumericsMode> parse_numerics_mode(std::string_view text);

}  // namespace dsv4
