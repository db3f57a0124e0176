#include "backends/cuda/linear_dispatch.hpp"

#include "backends/cuda/kernels/quantized_gemm.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4::cuda {

namespace {

size_t scale_entry_bytes(ScaleType type) { return type == ScaleType::F32 ? 4 : type == ScaleType::NONE ? 0 : 1; }

// Why the GEMM cannot run this call, or empty when it can.
std::string gemm_refusal(const QuantizedGemmParams& params) {
  try {
    check_quantized_gemm_params(params);
    return {};
  } catch (const Error& e) {
    return e.what();
  }
}

void warn_once(const void* matrix, std::string_view what, const std::string& reason) {
  static std::mutex mutex;
  static std::set<const void*> warned;
  const std::lock_guard lock(mutex);
  if (warned.insert(matrix).second)
    log_warning("prefill of ", what, " runs on the decode kernel in ", kLinearMaxTokens, "-token chunks (slower): ",
                reason);
}

void run_decode_chunks(const LinearCall& c) {
  for (int64_t t0 = 0; t0 < c.tokens; t0 += kLinearMaxTokens) {
    QuantizedLinearParams p;
    p.weight = c.weight;
    p.x = c.x != nullptr ? c.x + t0 * c.x_row_stride : nullptr;
    p.x_row_stride = c.x_row_stride;
    p.y = c.y != nullptr ? c.y + t0 * c.y_row_stride : nullptr;
    p.y_bf16 = c.y_bf16 != nullptr ? c.y_bf16 + t0 * c.y_row_stride : nullptr;
    p.y_row_stride = c.y_row_stride;
    p.tokens = int(std::min<int64_t>(kLinearMaxTokens, c.tokens - t0));
    p.groups = c.groups;
    p.workspace = c.workspace;
    p.workspace_bytes = c.workspace_bytes;
    p.stream = c.stream;
    if (c.norm_x != nullptr) p.norm_x = c.norm_x + t0 * c.x_row_stride;
    p.norm_weight = c.norm_weight;
    p.norm_eps = c.norm_eps;
    run_quantized_linear(p);
  }
}

QuantizedGemmParams gemm_params(const LinearCall& c) {
  QuantizedGemmParams p;
  p.weight = c.weight;
  p.x = c.x;
  p.x_row_stride = c.x_row_stride;
  p.y = c.y;
  p.y_bf16 = c.y_bf16;
  p.y_row_stride = c.y_row_stride;
  p.tokens = c.tokens;
  p.groups = c.groups;
  p.workspace = c.workspace;
  p.workspace_bytes = c.workspace_bytes;
  p.stream = c.stream;
  return p;
}

// The GEMM launches of a call (one, or one per group where the groups are not whole GEMM tiles), or empty with the
// reason in `refusal`.
std::vector<QuantizedGemmParams> gemm_launches(const LinearCall& c, std::string& refusal) {
  const QuantizedGemmParams whole = gemm_params(c);
  refusal = gemm_refusal(whole);
  if (refusal.empty()) return {whole};
  if (c.groups == 1) return {};
  const int64_t rows = c.weight.rows / c.groups;
  std::vector<QuantizedGemmParams> launches;
  for (int g = 0; g < c.groups; ++g) {
    QuantizedGemmParams p = whole;
    p.groups = 1;
    try {
      p.weight = row_slice(c.weight, g * rows, rows);
    } catch (const Error& e) {
      refusal = e.what();
      return {};
    }
    p.x = c.x + g * c.weight.cols;
    if (p.y != nullptr) p.y = c.y + g * rows;
    if (p.y_bf16 != nullptr) p.y_bf16 = c.y_bf16 + g * rows;
    refusal = gemm_refusal(p);
    if (!refusal.empty()) return {};
    launches.push_back(p);
  }
  return launches;
}

}  // namespace

DeviceMatrixView row_slice(const DeviceMatrixView& w, int64_t row0, int64_t rows) {
  check(row0 >= 0 && rows > 0 && row0 + rows <= w.rows, "row_slice: rows [", row0, ", ", row0 + rows,
        ") outside a matrix of ", w.rows, " rows");
  DeviceMatrixView v = w;
  v.rows = rows;
  v.data = w.data + row0 * w.data_row_bytes;
  if (w.scales) {
    int64_t scale_row = row0;
    if (w.format == WeightFormat::FP8_BLOCK128) {
      check(row0 % kFp8BlockSize == 0, "row_slice: FP8_BLOCK128 rows must start on a 128-row band, not ", row0);
      scale_row = row0 / kFp8BlockSize;
    }
    v.scales = w.scales + size_t(scale_row * w.scales_per_row) * scale_entry_bytes(w.scale_type);
  }
  v.stored_bytes = size_t(double(w.stored_bytes) * double(rows) / double(w.rows));
  return v;
}

size_t linear_workspace_bytes(const DeviceMatrixView& weight, int groups) {
  return std::max(quantized_linear_workspace_bytes(weight, kLinearMaxTokens, groups),
                  quantized_gemm_workspace_bytes(weight, kGemmMaxSplitTokens));
}

void run_linear(const LinearCall& c) {
  check(c.tokens >= 0 && c.groups >= 1, c.what, ": tokens ", c.tokens, ", groups ", c.groups);
  check(c.gemm_from_tokens >= 1 && c.gemm_from_tokens <= kLinearMaxTokens + 1, c.what, ": gemm_from_tokens ",
        c.gemm_from_tokens, " must be in [1, ", kLinearMaxTokens + 1, "]");
  if (c.tokens == 0) return;
  if (c.norm_x != nullptr) {
    check(c.tokens <= kLinearMaxTokens, c.what, ": the RMSNorm prologue runs on the decode kernel, up to ",
          kLinearMaxTokens, " tokens (not ", c.tokens, ")");
    return run_decode_chunks(c);
  }
  if (c.tokens < c.gemm_from_tokens) return run_decode_chunks(c);

  std::string refusal;
  const std::vector<QuantizedGemmParams> launches = gemm_launches(c, refusal);
  if (launches.empty()) {
    if (c.tokens > kLinearMaxTokens) warn_once(c.weight.data, c.what, refusal);
    return run_decode_chunks(c);
  }
  for (const QuantizedGemmParams& p : launches) run_quantized_gemm(p);
}

}  // namespace dsv4::cuda
