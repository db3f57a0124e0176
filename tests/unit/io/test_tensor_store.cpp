// TensorStore over single files, plain directories and sharded checkpoints with model.safetensors.index.json, and
// the sharded writer that produces them.
#include "io/tensor_store.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/safetensors_writer.hpp"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// A DeepSeek-style mix: fp8 weights with e8m0 scales, packed e2m1 experts as I8, bf16 norms.
std::vector<TensorSpec> checkpoint_specs() {
  std::mt19937 rng(3);
  std::vector<TensorSpec> specs;
  auto add = [&](std::string name, DType dtype, std::vector<int64_t> shape) {
    std::vector<uint8_t> bytes(*tensor_byte_size(dtype, shape));
    for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng());
    specs.push_back({std::move(name), dtype, std::move(shape), std::move(bytes)});
  };
  add("embed.weight", DType::BF16, {32, 16});
  for (int layer = 0; layer < 3; ++layer) {
    const std::string prefix = "layers." + std::to_string(layer) + ".";
    add(prefix + "attn.wq_a.weight", DType::F8_E4M3, {24, 16});
    add(prefix + "attn.wq_a.scale", DType::F8_E8M0, {1, 1});
    add(prefix + "ffn.experts.0.w1.weight", DType::I8, {16, 8});
    add(prefix + "ffn.experts.0.w1.scale", DType::F8_E8M0, {16, 1});
    add(prefix + "attn_norm.weight", DType::BF16, {16});
  }
  add("norm.weight", DType::F32, {16});
  add("head.weight", DType::BF16, {32, 16});
  return specs;
}

class TensorStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dsv4-test-tensor-store-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static SafetensorsWriter writer_for(const std::vector<TensorSpec>& specs) {
    SafetensorsWriter writer;
    for (const TensorSpec& spec : specs) {
      writer.add(spec.name, spec.dtype, spec.shape, spec.bytes.data(), spec.bytes.size());
    }
    return writer;
  }

  static void expect_holds_exactly(const TensorStore& store, const std::vector<TensorSpec>& specs) {
    ASSERT_EQ(store.size(), specs.size());
    size_t total = 0;
    for (const TensorSpec& spec : specs) {
      const TensorView* view = store.find(spec.name);
      ASSERT_NE(view, nullptr) << spec.name;
      EXPECT_EQ(view->dtype, spec.dtype) << spec.name;
      EXPECT_EQ(view->shape, spec.shape) << spec.name;
      ASSERT_EQ(view->bytes, spec.bytes.size()) << spec.name;
      EXPECT_TRUE(std::equal(spec.bytes.begin(), spec.bytes.end(), view->data)) << spec.name;
      total += spec.bytes.size();
    }
    EXPECT_EQ(store.total_bytes(), total);
    const std::vector<const TensorView*> all = store.all();
    ASSERT_EQ(all.size(), specs.size());
    for (size_t i = 1; i < all.size(); ++i) EXPECT_LT(all[i - 1]->name, all[i]->name);
  }

  void expect_open_error(const fs::path& path, std::initializer_list<std::string> fragments) {
    try {
      TensorStore::open(path.string());
      ADD_FAILURE() << "opened " << path;
    } catch (const Error& e) {
      for (const std::string& fragment : fragments) {
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
      }
    }
  }

  void write_text(const fs::path& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
  }

  // A checkpoint of several shards in dir_/ckpt; returns the shard names.
  std::vector<std::string> write_sharded_checkpoint(const std::vector<TensorSpec>& specs) {
    size_t total = 0;
    for (const TensorSpec& spec : specs) total += spec.bytes.size();
    return writer_for(specs).write_sharded((dir_ / "ckpt").string(), total / 3 + 1);
  }

  nlohmann::json read_index() {
    std::ifstream in(dir_ / "ckpt" / kSafetensorsIndexName);
    return nlohmann::json::parse(in);
  }

  fs::path dir_;
};

TEST_F(TensorStoreTest, ShardedRoundTripWritesIndexAndFindsEveryTensor) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  const std::vector<std::string> shards = write_sharded_checkpoint(specs);
  ASSERT_EQ(shards.size(), 4u);  // a third of the bytes per shard does not fall on tensor boundaries
  EXPECT_EQ(shards[0], "model-00001-of-00004.safetensors");
  EXPECT_EQ(shards[3], "model-00004-of-00004.safetensors");

  const nlohmann::json index = read_index();
  size_t total = 0;
  for (const TensorSpec& spec : specs) total += spec.bytes.size();
  EXPECT_EQ(index["metadata"]["total_size"].get<size_t>(), total);
  ASSERT_EQ(index["weight_map"].size(), specs.size());
  // Shards fill in the order tensors were added.
  EXPECT_EQ(index["weight_map"]["embed.weight"], shards.front());
  EXPECT_EQ(index["weight_map"]["head.weight"], shards.back());

  const TensorStore store = TensorStore::open((dir_ / "ckpt").string());
  EXPECT_EQ(store.shards().size(), shards.size());
  expect_holds_exactly(store, specs);
  for (const TensorSpec& spec : specs) {
    EXPECT_EQ(fs::path(store.find(spec.name)->file).filename(), index["weight_map"][spec.name].get<std::string>());
  }
  EXPECT_EQ(store.find("layers.9.attn.wq_a.weight"), nullptr);
}

TEST_F(TensorStoreTest, ShardSizeLimitIsRespectedAndOversizedTensorsGetTheirOwnShard) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  const size_t limit = 300;
  const std::vector<std::string> shards = writer_for(specs).write_sharded((dir_ / "ckpt").string(), limit);
  const TensorStore store = TensorStore::open((dir_ / "ckpt").string());
  expect_holds_exactly(store, specs);
  ASSERT_EQ(store.shards().size(), shards.size());
  for (const auto& shard : store.shards()) {
    size_t bytes = 0;
    for (const TensorView& view : shard->tensors()) bytes += view.bytes;
    EXPECT_TRUE(bytes <= limit || shard->tensors().size() == 1) << shard->path() << ": " << bytes;
  }
  EXPECT_EQ(store.find("embed.weight")->bytes, 1024u);  // larger than the limit: alone in its shard
}

TEST_F(TensorStoreTest, OpensASingleFileAndADirectoryWithoutIndex) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  fs::create_directories(dir_ / "plain");
  writer_for(specs).write((dir_ / "plain" / "model.safetensors").string());
  expect_holds_exactly(TensorStore::open((dir_ / "plain" / "model.safetensors").string()), specs);
  expect_holds_exactly(TensorStore::open((dir_ / "plain").string()), specs);

  // Two files, no index: both are read; stray non-safetensors files are ignored.
  fs::create_directories(dir_ / "two");
  const std::vector<TensorSpec> first(specs.begin(), specs.begin() + 5);
  const std::vector<TensorSpec> second(specs.begin() + 5, specs.end());
  writer_for(first).write((dir_ / "two" / "a.safetensors").string());
  writer_for(second).write((dir_ / "two" / "b.safetensors").string());
  write_text(dir_ / "two" / "config.json", "{}");
  const TensorStore store = TensorStore::open((dir_ / "two").string());
  EXPECT_EQ(store.shards().size(), 2u);
  expect_holds_exactly(store, specs);
}

TEST_F(TensorStoreTest, KeepaliveOutlivesTheStoreAndFeedsTheWriterWithoutCopies) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  write_sharded_checkpoint(specs);
  std::shared_ptr<const void> owner;
  const TensorView* view = nullptr;
  SafetensorsWriter rewriter;
  {
    const TensorStore store = TensorStore::open((dir_ / "ckpt").string());
    view = store.find("layers.1.ffn.experts.0.w1.weight");
    ASSERT_NE(view, nullptr);
    owner = store.keepalive(*view);
    EXPECT_EQ(owner, std::static_pointer_cast<const void>(
                         *std::find_if(store.shards().begin(), store.shards().end(),
                                       [&](const auto& shard) { return shard->path() == view->file; })));
    for (const TensorView* source : store.all()) {
      rewriter.add(source->name, source->dtype, source->shape, source->data, source->bytes, store.keepalive(*source));
    }
  }
  // The store is gone; its shard mappings live on through the keepalives.
  const auto expected = std::find_if(specs.begin(), specs.end(), [&](const TensorSpec& spec) { return spec.name == view->name; });
  ASSERT_NE(expected, specs.end());
  EXPECT_TRUE(std::equal(expected->bytes.begin(), expected->bytes.end(), view->data));
  rewriter.write((dir_ / "rewritten.safetensors").string());
  expect_holds_exactly(TensorStore::open((dir_ / "rewritten.safetensors").string()), specs);
}

TEST_F(TensorStoreTest, KeepaliveRejectsForeignViews) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  write_sharded_checkpoint(specs);
  const TensorStore store = TensorStore::open((dir_ / "ckpt").string());
  const TensorStore other = TensorStore::open((dir_ / "ckpt").string());
  try {
    store.keepalive(*other.find("norm.weight"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'norm.weight'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("does not belong"), std::string::npos) << e.what();
  }
}

TEST_F(TensorStoreTest, MissingShardNamesIndexShardAndTensor) {
  const std::vector<std::string> shards = write_sharded_checkpoint(checkpoint_specs());
  fs::remove(dir_ / "ckpt" / shards[1]);
  expect_open_error(dir_ / "ckpt", {kSafetensorsIndexName, "shard '" + shards[1] + "'", "holding tensor 'layers.",
                                    "is missing"});
}

TEST_F(TensorStoreTest, TensorListedInIndexButAbsentFromShard) {
  write_sharded_checkpoint(checkpoint_specs());
  nlohmann::json index = read_index();
  index["weight_map"]["layers.7.attn.wq_a.weight"] = index["weight_map"]["norm.weight"];
  write_text(dir_ / "ckpt" / kSafetensorsIndexName, index.dump());
  expect_open_error(dir_ / "ckpt", {"tensor 'layers.7.attn.wq_a.weight' is listed in shard 'model-0000",
                                    "does not hold it", kSafetensorsIndexName});
}

TEST_F(TensorStoreTest, ShardHoldingTensorsTheIndexDoesNotListOrListsElsewhere) {
  const std::vector<std::string> shards = write_sharded_checkpoint(checkpoint_specs());
  nlohmann::json index = read_index();
  const std::string moved_shard = index["weight_map"]["norm.weight"];
  index["weight_map"].erase("norm.weight");
  write_text(dir_ / "ckpt" / kSafetensorsIndexName, index.dump());
  expect_open_error(dir_ / "ckpt", {moved_shard, "holds tensor 'norm.weight'", "does not list"});

  index["weight_map"]["norm.weight"] = moved_shard == shards[0] ? shards[1] : shards[0];
  write_text(dir_ / "ckpt" / kSafetensorsIndexName, index.dump());
  expect_open_error(dir_ / "ckpt", {"norm.weight"});
}

TEST_F(TensorStoreTest, MalformedIndexIsRejected) {
  write_sharded_checkpoint(checkpoint_specs());
  const fs::path index = dir_ / "ckpt" / kSafetensorsIndexName;
  write_text(index, "{\"weight_map\": ");
  expect_open_error(dir_ / "ckpt", {kSafetensorsIndexName, "not valid JSON"});
  write_text(index, std::string("{\"weight_map\": {}}\0garbage", 26));
  expect_open_error(dir_ / "ckpt", {kSafetensorsIndexName, "NUL byte"});
  write_text(index, "[]");
  expect_open_error(dir_ / "ckpt", {"expected a JSON object"});
  write_text(index, R"({"metadata": {}})");
  expect_open_error(dir_ / "ckpt", {"missing 'weight_map'"});
  write_text(index, R"({"weight_map": []})");
  expect_open_error(dir_ / "ckpt", {"'weight_map' is array"});
  write_text(index, R"({"weight_map": {}})");
  expect_open_error(dir_ / "ckpt", {"lists no tensors"});
  write_text(index, R"({"weight_map": {"w": 3}})");
  expect_open_error(dir_ / "ckpt", {"tensor 'w' maps to 3"});
  write_text(index, R"({"weight_map": {"w": "../outside.safetensors"}})");
  expect_open_error(dir_ / "ckpt", {"tensor 'w' maps to '../outside.safetensors'", "same directory"});
  write_text(index, R"({"weight_map": {"w": ".."}})");
  expect_open_error(dir_ / "ckpt", {"same directory"});
}

TEST_F(TensorStoreTest, CorruptShardErrorNamesTheShard) {
  const std::vector<std::string> shards = write_sharded_checkpoint(checkpoint_specs());
  const fs::path victim = dir_ / "ckpt" / shards[2];
  fs::resize_file(victim, fs::file_size(victim) - 3);
  expect_open_error(dir_ / "ckpt", {victim.string(), "run past the end of the data section"});
}

TEST_F(TensorStoreTest, DuplicateTensorAcrossFilesWithoutIndex) {
  const std::vector<TensorSpec> specs = checkpoint_specs();
  writer_for({specs[0], specs[1]}).write((dir_ / "a.safetensors").string());
  writer_for({specs[1], specs[2]}).write((dir_ / "b.safetensors").string());
  expect_open_error(dir_, {"tensor '" + specs[1].name + "' appears in both", "a.safetensors", "b.safetensors"});
}

TEST_F(TensorStoreTest, EmptyOrMissingPaths) {
  expect_open_error(dir_, {dir_.string(), "no model.safetensors.index.json and no *.safetensors files"});
  expect_open_error(dir_ / "nowhere", {"no such file or directory"});
}

TEST_F(TensorStoreTest, EmptyWriterShardsIntoOneValidShard) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  const std::vector<std::string> shards = writer.write_sharded((dir_ / "ckpt").string(), 1024);
  ASSERT_EQ(shards.size(), 1u);
  const auto shard = SafetensorsFile::open((dir_ / "ckpt" / shards[0]).string());
  EXPECT_TRUE(shard->tensors().empty());
  EXPECT_EQ(shard->metadata().at("format"), "pt");
  // An index that lists nothing is not a usable checkpoint.
  expect_open_error(dir_ / "ckpt", {"lists no tensors"});
}

}  // namespace
}  // namespace dsv4
