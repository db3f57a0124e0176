#include "backends/cuda/kernels/sampling.hpp"

#include <mutex>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/sampling.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

// The kernel may use all the shared memory a CTA can have, granted once per device (a per-launch call would cost
// host time on every step).
void allow_kernel_shared_memory() {
  static std::mutex mutex;
  static std::vector<bool> granted;
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  if (granted.size() <= size_t(device)) granted.resize(size_t(device) + 1, false);
  if (granted[size_t(device)]) return;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(sampling_detail::sample_rows_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, sampling_detail::kMaxSharedBytes));
  granted[size_t(device)] = true;
}

}  // namespace

int64_t max_sampling_vocab() {
  const int64_t slice_bytes = sampling_detail::kMaxSharedBytes - int64_t(sizeof(sampling_detail::SharedPlan));
  return slice_bytes / int64_t(sizeof(float)) * sampling_detail::kClusterCtas;
}

void check_sampling_params(const SamplingLaunchParams& p) {
  check(p.rows >= 1 && p.rows <= INT32_MAX / sampling_detail::kClusterCtas, "sampling: rows ", p.rows,
        " must be in [1, ", INT32_MAX / sampling_detail::kClusterCtas, "]");
  check(p.vocab >= 1 && p.vocab <= max_sampling_vocab(), "sampling: vocab ", p.vocab, " must be in [1, ",
        max_sampling_vocab(), "] (a row lives in its cluster's shared memory)");
  check(p.row_stride >= p.vocab, "sampling: row_stride ", p.row_stride, " is below the vocab ", p.vocab);
  check(p.logits != nullptr, "sampling: logits are required");
  check(p.row_params != nullptr, "sampling: row_params are required");
  check(p.results != nullptr, "sampling: results are required");
}

void run_sampling(const SamplingLaunchParams& p) {
  check_sampling_params(p);
  const size_t smem = sampling_detail::shared_bytes(p.vocab);
  allow_kernel_shared_memory();
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = sampling_detail::kClusterCtas;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(p.rows * sampling_detail::kClusterCtas));
  config.blockDim = dim3(sampling_detail::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = p.stream;
  config.attrs = attributes;
  config.numAttrs = 2;
  check_cuda(cudaLaunchKernelEx(&config, sampling_detail::sample_rows_kernel, p), "sampling", __FILE__, __LINE__);
}

void check_sampled_token(const SampledToken& result) {
  switch (result.status) {
    case SamplingStatus::Ok:
      return;
    case SamplingStatus::NanLogit:
    case SamplingStatus::InfiniteLogit:
      fail(sampling::bad_logit_message(result.bad_token, result.status == SamplingStatus::NanLogit));
    case SamplingStatus::AllMinusInfinity:
      fail("sampler: every logit is -inf, there is no token to sample");
  }
  fail("sampling: unknown status ", int32_t(result.status), " (token ", result.token, ")");
}

}  // namespace dsv4::cuda
