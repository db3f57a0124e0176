#include "backends/cuda/linear_dispatch.hpp"

#include "backends/cuda/kernels/quantized_gemm.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

#include <mutex>
#include <string>
#include <vector>
#include <set>

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
    p.x = c.x + t0 * c.x_row_stride;
    p.x_row_stride = c.x_row_stride;
    p.y = c.y + t0 * c.y_row_stride;
    p.y_row_stride = c.y_row_stride;
    p.tokens = int(std::min<int64_t>(kLinearMaxTokens, c.tokens - t0));
    p.groups = c.groups;
    p.workspace = c.workspace;
    p.workspace_bytes = c.workspace_bytes;
    p.stream = c.stream;
    run_quantized_linear(p);
  }
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
  return quantized_linear_workspace_bytes(weight, kLinearMaxTokens, groups);
}

void run_linear(const LinearCall& c) {
  check(c.tokens >= 0 && c.groups >= 1, c.what, ": tokens ", c.tokens, ", groups ", c.groups);
  if (c.tokens == 0) return;
  if (c.tokens <= kLinearMaxTokens) return run_decode_chunks(c);

  const int64_t rows = c.weight.rows / c.groups;
  std::string refusal;
  std::vector<QuantizedGemmParams> launches;
  for (int g = 0; g < c.groups && refusal.empty(); ++g) {
    QuantizedGemmParams p;
    try {
      p.weight = c.groups == 1 ? c.weight : row_slice(c.weight, g * rows, rows);
    } catch (const Error& e) {
      refusal = e.what();
      break;
    }
    p.x = c.x + g * c.weight.cols;
    p.x_row_stride = c.x_row_stride;
    p.y = c.y + g * rows;
    p.y_row_stride = c.y_row_stride;
    p.tokens = c.tokens;
    p.stream = c.stream;
    refusal = gemm_refusal(p);
    launches.push_back(p);
  }
  if (!refusal.empty()) {
    warn_once(c.weight.data, c.what, refusal);
    return run_decode_chunks(c);
  }
  for (const QuantizedGemmParams& p : launches) run_quantized_gemm(p);
}

}  // namespace dsv4::cuda
