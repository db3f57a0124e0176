// What the whole-model GPU tests share: a checkpoint fixture of the source tree loaded, its gtest parameter name,
// and random prompts.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "model/checkpoint_loader.hpp"

namespace dsv4::testing {

// A checkpoint directory under the source tree (a golden fixture or a tiny model), loaded and checked loadable.
struct ModelFixture {
  LoadedCheckpoint ckpt;
  explicit ModelFixture(const std::string& source_relative_dir)
      : ckpt(load_checkpoint((std::filesystem::path(DSV4_SOURCE_DIR) / source_relative_dir).string())) {
    ckpt.require_loadable();
  }
};

// gtest's name for a fixture-directory parameter: the last path component, '-' turned to '_' (gtest allows only
// letters, digits and '_').
inline std::string fixture_param_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string name = std::filesystem::path(info.param).filename().string();
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

// `count` token ids uniform in [0, vocab), drawn from `rng`.
inline std::vector<int32_t> random_tokens(int64_t count, int64_t vocab, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> pick(0, int32_t(vocab - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  for (int32_t& t : tokens) t = pick(rng);
  return tokens;
}

}  // namespace dsv4::testing
