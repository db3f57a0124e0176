// The scalar format headers decode and encode bit-identically on the device and on the host: one kernel runs every
// e4m3/e8m0/e2m1 code and a spread of bf16 values through the shared DSV4_HD functions.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/bf16.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_block.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"

namespace dsv4 {
namespace {

constexpr int kCodes = 256;

struct DeviceResults {
  uint32_t e4m3_decoded[kCodes];
  uint32_t e8m0_decoded[kCodes];
  uint32_t e2m1_decoded[16];
  uint8_t e4m3_reencoded[kCodes];
  uint8_t e8m0_reencoded[kCodes];
  uint8_t e2m1_reencoded[16];
};

__global__ void decode_all_codes(DeviceResults* results) {
  const int code = threadIdx.x;
  const float e4m3 = e4m3_to_float(uint8_t(code));
  const float e8m0 = e8m0_to_float(uint8_t(code));
  results->e4m3_decoded[code] = float_to_bits(e4m3);
  results->e8m0_decoded[code] = float_to_bits(e8m0);
  results->e4m3_reencoded[code] = float_to_e4m3(e4m3);
  results->e8m0_reencoded[code] = float_to_e8m0_ceil(e8m0);
  if (code < 16) {
    const float e2m1 = e2m1_to_float(uint8_t(code));
    results->e2m1_decoded[code] = float_to_bits(e2m1);
    results->e2m1_reencoded[code] = float_to_e2m1(e2m1);
  }
}

// For each input float: its bf16 code, the e4m3 and e2m1 codes it rounds to, and the e8m0 ceiling of |x|.
__global__ void encode_floats(const float* inputs, int count, uint16_t* bf16, uint8_t* e4m3, uint8_t* e2m1,
                              uint8_t* e8m0, uint32_t* bf16_decoded) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const float x = inputs[i];
  bf16[i] = float_to_bf16(x);
  bf16_decoded[i] = float_to_bits(bf16_to_float(bf16[i]));
  e4m3[i] = float_to_e4m3(x);
  e2m1[i] = float_to_e2m1(x);
  e8m0[i] = float_to_e8m0_ceil(x < 0 ? -x : x);
}

// Block-scale rules of the codecs, which the CUDA quantizers (fp8 KV cache, fp4 indexer) share with the host.
__global__ void block_scales(const float* amaxes, int count, float global, uint8_t* fp8_e8m0, uint32_t* fp8_f32,
                             uint8_t* mxfp4, uint8_t* nvfp4) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  fp8_e8m0[i] = fp8_e8m0_scale_for_amax(amaxes[i]);
  fp8_f32[i] = float_to_bits(fp8_f32_scale_for_amax(amaxes[i]));
  mxfp4[i] = mxfp4_scale_for_amax(amaxes[i]);
  nvfp4[i] = nvfp4_scale_for_amax(amaxes[i], global);
}

bool have_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

#define ASSERT_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

TEST(FormatsDevice, EveryCodeDecodesBitIdenticallyToTheHost) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  DeviceResults* device_results = nullptr;
  ASSERT_CUDA(cudaMalloc(&device_results, sizeof(DeviceResults)));
  decode_all_codes<<<1, kCodes>>>(device_results);
  ASSERT_CUDA(cudaGetLastError());
  DeviceResults results{};
  ASSERT_CUDA(cudaMemcpy(&results, device_results, sizeof results, cudaMemcpyDeviceToHost));
  ASSERT_CUDA(cudaFree(device_results));

  for (int code = 0; code < kCodes; ++code) {
    const float e4m3 = e4m3_to_float(uint8_t(code)), e8m0 = e8m0_to_float(uint8_t(code));
    EXPECT_EQ(results.e4m3_decoded[code], float_to_bits(e4m3)) << "e4m3 code " << code;
    EXPECT_EQ(results.e8m0_decoded[code], float_to_bits(e8m0)) << "e8m0 code " << code;
    EXPECT_EQ(results.e4m3_reencoded[code], float_to_e4m3(e4m3)) << "e4m3 code " << code;
    EXPECT_EQ(results.e8m0_reencoded[code], float_to_e8m0_ceil(e8m0)) << "e8m0 code " << code;
  }
  for (int nibble = 0; nibble < 16; ++nibble) {
    const float e2m1 = e2m1_to_float(uint8_t(nibble));
    EXPECT_EQ(results.e2m1_decoded[nibble], float_to_bits(e2m1)) << "e2m1 code " << nibble;
    EXPECT_EQ(results.e2m1_reencoded[nibble], float_to_e2m1(e2m1)) << "e2m1 code " << nibble;
  }
}

TEST(FormatsDevice, EncodersMatchTheHostOnRandomAndTieValues) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<float> inputs = {0.0f, -0.0f, 0.25f, 0.75f, 1.25f, 5.0f, 440.0f, 1e30f, 0x1p-10f, 3 * 0x1p-10f,
                               1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, bits_to_float(0x7F800001u),
                               bits_to_float(0x7F800000u), bits_to_float(0x00000001u), bits_to_float(0x7F7FFFFFu)};
  std::mt19937 rng(23);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int i = 0; i < 4096; ++i) inputs.push_back(normal(rng));
  for (int i = 0; i < 4096; ++i) inputs.push_back(bits_to_float(rng()));
  const int count = int(inputs.size());

  float* device_inputs = nullptr;
  uint8_t* device_codes = nullptr;  // e4m3, e2m1, e8m0 codes (count each), then bf16 codes, then decoded bf16
  const size_t code_bytes = 3 * size_t(count) + 2 * size_t(count) + 4 * size_t(count);
  ASSERT_CUDA(cudaMalloc(&device_inputs, count * sizeof(float)));
  ASSERT_CUDA(cudaMalloc(&device_codes, code_bytes));
  ASSERT_CUDA(cudaMemcpy(device_inputs, inputs.data(), count * sizeof(float), cudaMemcpyHostToDevice));
  uint8_t* device_e4m3 = device_codes;
  uint8_t* device_e2m1 = device_e4m3 + count;
  uint8_t* device_e8m0 = device_e2m1 + count;
  auto* device_bf16 = reinterpret_cast<uint16_t*>(device_e8m0 + count);
  auto* device_bf16_decoded = reinterpret_cast<uint32_t*>(device_bf16 + count);
  // The bf16 and decoded arrays need their natural alignment: count is a multiple of 4 here.
  ASSERT_EQ(count % 4, 0);
  encode_floats<<<(count + 255) / 256, 256>>>(device_inputs, count, device_bf16, device_e4m3, device_e2m1,
                                               device_e8m0, device_bf16_decoded);
  ASSERT_CUDA(cudaGetLastError());
  std::vector<uint8_t> codes(code_bytes);
  ASSERT_CUDA(cudaMemcpy(codes.data(), device_codes, code_bytes, cudaMemcpyDeviceToHost));
  ASSERT_CUDA(cudaFree(device_inputs));
  ASSERT_CUDA(cudaFree(device_codes));

  const uint8_t* e4m3 = codes.data();
  const uint8_t* e2m1 = e4m3 + count;
  const uint8_t* e8m0 = e2m1 + count;
  const auto* bf16 = reinterpret_cast<const uint16_t*>(e8m0 + count);
  const auto* bf16_decoded = reinterpret_cast<const uint32_t*>(bf16 + count);
  for (int i = 0; i < count; ++i) {
    const float x = inputs[i];
    ASSERT_EQ(e4m3[i], float_to_e4m3(x)) << "e4m3 of " << x;
    ASSERT_EQ(e2m1[i], float_to_e2m1(x)) << "e2m1 of " << x;
    ASSERT_EQ(e8m0[i], float_to_e8m0_ceil(x < 0 ? -x : x)) << "e8m0 of " << x;
    ASSERT_EQ(bf16[i], float_to_bf16(x)) << "bf16 of " << x;
    ASSERT_EQ(bf16_decoded[i], float_to_bits(bf16_to_float(bf16[i]))) << "bf16 decode of " << x;
  }
}

TEST(FormatsDevice, BlockScaleRulesMatchTheHost) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<float> amaxes = {0.0f, 1e-5f, 1e-4f, 6.0f, 448.0f, 2688.0f, 1e30f, bits_to_float(1u)};
  std::mt19937 rng(29);
  std::uniform_real_distribution<float> log_amax(-30.0f, 30.0f);
  while (amaxes.size() < 4096) amaxes.push_back(std::exp2(log_amax(rng)));
  const int count = int(amaxes.size());
  const float global = 0x1p-7f * 1.37f;

  float* device_amaxes = nullptr;
  uint8_t* device_out = nullptr;  // f32 scale bits (4 bytes each), then e8m0, mxfp4 and nvfp4 codes
  ASSERT_CUDA(cudaMalloc(&device_amaxes, count * sizeof(float)));
  ASSERT_CUDA(cudaMalloc(&device_out, 7 * size_t(count)));
  ASSERT_CUDA(cudaMemcpy(device_amaxes, amaxes.data(), count * sizeof(float), cudaMemcpyHostToDevice));
  auto* device_f32 = reinterpret_cast<uint32_t*>(device_out);
  uint8_t* device_codes = device_out + 4 * size_t(count);
  block_scales<<<(count + 255) / 256, 256>>>(device_amaxes, count, global, device_codes, device_f32,
                                             device_codes + count, device_codes + 2 * count);
  ASSERT_CUDA(cudaGetLastError());
  std::vector<uint8_t> out(7 * size_t(count));
  ASSERT_CUDA(cudaMemcpy(out.data(), device_out, out.size(), cudaMemcpyDeviceToHost));
  ASSERT_CUDA(cudaFree(device_amaxes));
  ASSERT_CUDA(cudaFree(device_out));

  const auto* f32 = reinterpret_cast<const uint32_t*>(out.data());
  const uint8_t* codes = out.data() + 4 * size_t(count);
  for (int i = 0; i < count; ++i) {
    const float amax = amaxes[i];
    ASSERT_EQ(f32[i], float_to_bits(fp8_f32_scale_for_amax(amax))) << "fp8 f32 scale for " << amax;
    ASSERT_EQ(codes[i], fp8_e8m0_scale_for_amax(amax)) << "fp8 e8m0 scale for " << amax;
    ASSERT_EQ(codes[count + i], mxfp4_scale_for_amax(amax)) << "mxfp4 scale for " << amax;
    ASSERT_EQ(codes[2 * count + i], nvfp4_scale_for_amax(amax, global)) << "nvfp4 scale for " << amax;
  }
}

}  // namespace
}  // namespace dsv4
