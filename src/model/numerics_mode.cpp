#include "model/numerics_mode.hpp"

namespace dsv4 {

std::string_view to_string(NumericsMode mode) {
  switch (mode) {
    case NumericsMode::Exact: return "exact";
    case NumericsMode::Reference: return "reference";
    case NumericsMode::GpuBf16: return "gpu-bf16";
  }
  return "unknown";
}

std::optional<NumericsMode> parse_numerics_mode(std::string_view text) {
  for (NumericsMode mode : {NumericsMode::Exact, NumericsMode::Reference, NumericsMode::GpuBf16})
    if (text == to_string(mode)) return mode;
  return std::nullopt;
}

}  // namespace dsv4
