#include "model/numerics_mode.hpp"

namespace dsv4 {

std::string_view to_string(NumericsMode mode) { return mode == NumericsMode::Exact ? "exact" : "reference"; }

std::optional<NumericsMode> parse_numerics_mode(std::string_view text) {
  if (text == "exact") return NumericsMode::Exact;
  if (text == "reference") return NumericsMode::Reference;
  return std::nullopt;
}

}  // namespace dsv4
