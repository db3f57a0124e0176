// Built-in model configs: each equals the release config.json it was taken from, lookup by name or path, and
// first_layers keeps the layer kinds, ratios and routing of the layers it keeps.
#include "io/builtin_configs.hpp"

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace {

using dsv4::LayerKind;
using dsv4::ModelConfig;

std::filesystem::path fixture_path(const std::string& name) {
  return std::filesystem::path(DSV4_SOURCE_DIR) / "tests" / "unit" / "io" / "configs" / name;
}

void expect_error(const auto& call, const std::string& fragment) {
  try {
    call();
    FAIL() << "expected an error containing '" << fragment << "'";
  } catch (const dsv4::Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(BuiltinConfigs, EqualTheReleaseConfigFiles) {
  for (const char* name : {"flash", "pro"}) {
    const std::optional<ModelConfig> builtin = dsv4::builtin_config(name);
    ASSERT_TRUE(builtin.has_value()) << name;
    const ModelConfig file = ModelConfig::from_file(fixture_path(std::string(name) + "_release_config.json"));
    EXPECT_EQ(*builtin, file) << name;
    EXPECT_EQ(builtin->num_mtp_layers, file.num_mtp_layers) << name;
    EXPECT_EQ(builtin->origin, std::string("built-in config '") + name + "'");
  }
  EXPECT_EQ(dsv4::builtin_config("flash")->hidden_size, 4096);
  EXPECT_EQ(dsv4::builtin_config("pro")->hidden_size, 7168);
  EXPECT_EQ(dsv4::builtin_config_names().size(), 2u);
  EXPECT_FALSE(dsv4::builtin_config("Flash").has_value());
}

TEST(BuiltinConfigs, ResolvesNamesFilesAndDirectories) {
  EXPECT_EQ(dsv4::resolve_model_config("pro").num_layers, 61);
  EXPECT_EQ(dsv4::resolve_model_config(fixture_path("flash_release_config.json").string()),
            *dsv4::builtin_config("flash"));
  const std::filesystem::path tiny = std::filesystem::path(DSV4_SOURCE_DIR) / "models" / "tiny-fortunes";
  if (std::filesystem::exists(tiny)) EXPECT_EQ(dsv4::resolve_model_config(tiny.string()).hidden_size, 128);
  expect_error([] { dsv4::resolve_model_config("flush"); }, "'flush' is neither a built-in model config");
}

TEST(BuiltinConfigs, FirstLayersKeepTheirKindsAndRouting) {
  const ModelConfig flash = *dsv4::builtin_config("flash");
  for (int layers : {1, 2, 3, 4, 7, 43}) {
    const ModelConfig cut = dsv4::first_layers(flash, layers);
    EXPECT_EQ(cut.num_layers, layers);
    EXPECT_EQ(cut.num_mtp_layers, 0);
    for (int i = 0; i < layers; ++i) {
      EXPECT_EQ(cut.layer_kind(i), flash.layer_kind(i)) << layers << " layers, layer " << i;
      EXPECT_EQ(cut.compress_ratio(i), flash.compress_ratio(i)) << layers << " layers, layer " << i;
      EXPECT_EQ(cut.is_hash_routed(i), flash.is_hash_routed(i)) << layers << " layers, layer " << i;
    }
    EXPECT_EQ(cut.hidden_size, flash.hidden_size);
    EXPECT_EQ(cut.moe, flash.moe);
  }
  // Flash: layers 0-1 sliding-window, then CSA (ratio 4) and HCA (ratio 128) alternate; the first 3 hash-routed.
  EXPECT_EQ(dsv4::describe_layer_kinds(dsv4::first_layers(flash, 4)), "4 layers: 2 SWA, 1 CSA, 1 HCA; 3 hash-routed");
  EXPECT_EQ(dsv4::first_layers(flash, 3).layer_kind(2), LayerKind::CompressedSparse);
  expect_error([&] { dsv4::first_layers(flash, 0); }, "--layers: 0 is not in [1, 43]");
  expect_error([&] { dsv4::first_layers(flash, 44); }, "--layers: 44 is not in [1, 43]");
}

}  // namespace
