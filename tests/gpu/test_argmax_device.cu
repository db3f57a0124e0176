// The device greedy argmax against the CPU rule (the lowest id holding the maximum): random rows at the DSV4 vocab
// (129280) and odd widths, batch rows 1..256, planted ties (the lower id must win), -0 against +0, infinities, a
// padded row stride (scalar loads) and an unaligned base, NaN rows (lowest NaN id, flag set). The id output is
// poisoned before each run and every row is checked.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/kernels/argmax.hpp"
#include "core/error.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// The CPU sampler's greedy choice (max_element, then the first id equal to it); NaN rows: the first NaN.
int32_t reference_argmax(const float* row, int64_t vocab) {
  for (int64_t i = 0; i < vocab; ++i)
    if (std::isnan(row[i])) return int32_t(i);
  const float best = *std::max_element(row, row + vocab);
  return int32_t(std::find(row, row + vocab, best) - row);
}

struct Case {
  int64_t rows, vocab, stride, offset;  // offset: floats between the buffer start and row 0
};

// Runs the kernel on `values` (rows × stride, row 0 at `offset` floats) and checks every row and the NaN flag.
void check_rows(const std::vector<float>& values, const Case& c, const std::string& what) {
  SCOPED_TRACE(what + ": rows " + std::to_string(c.rows) + " vocab " + std::to_string(c.vocab) + " stride " +
               std::to_string(c.stride) + " offset " + std::to_string(c.offset));
  const DeviceBuffer logits = to_device(values, "logits");
  DeviceBuffer ids(size_t(c.rows) * sizeof(int32_t), "ids");
  ids.fill_bytes(0xFF);  // -1: never a valid id
  DeviceBuffer flag(sizeof(int32_t), "nan flag");
  flag.fill_bytes(0);
  ArgmaxParams p;
  p.logits = logits.as<float>() + c.offset, p.rows = c.rows, p.vocab = c.vocab, p.row_stride = c.stride;
  p.ids = ids.as<int32_t>(), p.nan_flag = flag.as<int32_t>();
  run_argmax(p);
  std::vector<int32_t> got(size_t(c.rows));
  ids.download(got.data(), got.size() * sizeof(int32_t));
  int32_t nan_flag = -1;
  flag.download(&nan_flag, sizeof nan_flag);
  bool any_nan = false;
  int mismatches = 0;
  for (int64_t r = 0; r < c.rows; ++r) {
    const float* row = values.data() + c.offset + r * c.stride;
    any_nan |= std::any_of(row, row + c.vocab, [](float v) { return std::isnan(v); });
    const int32_t want = reference_argmax(row, c.vocab);
    if (got[size_t(r)] != want && ++mismatches <= 5)
      ADD_FAILURE() << "row " << r << ": expected id " << want << " (" << row[want] << "), got " << got[size_t(r)]
                    << (got[size_t(r)] >= 0 && got[size_t(r)] < c.vocab
                            ? " (" + std::to_string(row[got[size_t(r)]]) + ")"
                            : std::string(" (not an id)"));
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(nan_flag, any_nan ? 1 : 0);
}

std::vector<float> random_rows(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> values(size_t(c.offset + c.rows * c.stride));
  for (float& v : values) v = normal(rng);
  return values;
}

TEST(ArgmaxDevice, RandomRowsMatchTheCpuRule) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const Case cases[] = {{1, 129280, 129280, 0}, {8, 129280, 129280, 0}, {256, 129280, 129280, 0},
                        {3, 1, 1, 0},           {5, 7, 7, 0},           {64, 4099, 4099, 0},
                        {7, 4096, 4100, 0},     {9, 1025, 1031, 3},     {2, 129280, 129280, 1}};
  uint32_t seed = 1;
  for (const Case& c : cases) check_rows(random_rows(c, seed++), c, "random");
}

TEST(ArgmaxDevice, TiesGoToTheLowestId) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const Case c{32, 129280, 129280, 0};
  std::vector<float> values = random_rows(c, 77);
  std::mt19937 rng(78);
  for (int64_t r = 0; r < c.rows; ++r) {
    float* row = values.data() + r * c.stride;
    // The maximum planted at 2-4 ids, spread so that different threads and vector lanes hold the copies.
    std::uniform_int_distribution<int64_t> pick(0, c.vocab - 1);
    const int copies = 2 + int(r % 3);
    for (int k = 0; k < copies; ++k) row[pick(rng)] = 100.0f;
    if (r % 4 == 0) row[r] = 100.0f, row[r + 1] = 100.0f;  // adjacent ids, one float4
  }
  check_rows(values, c, "ties");
}

TEST(ArgmaxDevice, SignedZerosInfinitiesAndNan) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const Case c{8, 1000, 1000, 0};
  std::vector<float> values(size_t(c.rows * c.stride), -1.0f);
  auto row = [&](int64_t r) { return values.data() + r * c.stride; };
  row(0)[10] = -0.0f, row(0)[20] = 0.0f;         // equal values: id 10
  row(1)[10] = 0.0f, row(1)[20] = -0.0f;         // id 10
  row(2)[500] = kInf, row(2)[900] = kInf;        // id 500
  std::fill(row(3), row(3) + c.vocab, -kInf);    // all -inf: id 0
  row(4)[999] = 5.0f;                            // the last id
  std::fill(row(5), row(5) + c.vocab, -3.0e38f);  // all equal: id 0
  row(5)[0] = -kInf;                             // ... but id 0 lower: id 1
  check_rows(values, c, "special values");
  row(6)[300] = kNan, row(6)[200] = kNan, row(6)[100] = kInf;  // NaN row: the lowest NaN, 200, and the flag
  row(7)[3] = -kNan;
  check_rows(values, c, "NaN rows");
}

TEST(ArgmaxDevice, RefusesBadParams) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer logits(64 * sizeof(float), "logits"), ids(16 * sizeof(int32_t), "ids");
  ArgmaxParams p;
  p.logits = logits.as<float>(), p.rows = 2, p.vocab = 32, p.row_stride = 32, p.ids = ids.as<int32_t>();
  auto expect_error = [](ArgmaxParams bad, const std::string& fragment) {
    testing::expect_error([&] { run_argmax(bad); }, fragment);
  };
  ArgmaxParams bad = p;
  bad.row_stride = 31;
  expect_error(bad, "row_stride 31 is below the vocab 32");
  bad = p, bad.rows = 0;
  expect_error(bad, "rows 0");
  bad = p, bad.vocab = 0, bad.row_stride = 0;
  expect_error(bad, "vocab 0");
  bad = p, bad.ids = nullptr;
  expect_error(bad, "ids output is required");
  bad = p, bad.logits = nullptr;
  expect_error(bad, "logits are required");
}

}  // namespace
}  // namespace dsv4::cuda
