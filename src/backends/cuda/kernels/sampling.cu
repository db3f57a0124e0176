#include "backends/cuda/kernels/sampling.hpp"

#include <mutex>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/sampling.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

struct DeviceSetup {
  bool done = false;
  int multiprocessors = 0;
  bool wide_clusters = false;  // the GPU schedules kWideClusterCtas-CTA clusters of this kernel
};

cudaLaunchConfig_t launch_config(const SamplingLaunchParams& p, int cluster_ctas, cudaLaunchAttribute* attributes) {
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = unsigned(cluster_ctas);
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(p.rows * cluster_ctas));
  config.blockDim = dim3(sampling_detail::kThreads);
  config.dynamicSmemBytes = sampling_detail::shared_bytes(p.vocab, cluster_ctas);
  config.stream = p.stream;
  config.attrs = attributes;
  config.numAttrs = 2;
  return config;
}

// Once per device: the kernel may use all the shared memory a CTA can have and clusters of 16 CTAs, and whether such
// clusters fit this GPU (a per-launch query would cost host time on every step).
const DeviceSetup& device_setup(const SamplingLaunchParams& p) {
  static std::mutex mutex;
  static std::vector<DeviceSetup> setups;
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  if (setups.size() <= size_t(device)) setups.resize(size_t(device) + 1);
  DeviceSetup& setup = setups[size_t(device)];
  if (setup.done) return setup;
  const auto kernel = sampling_detail::sample_rows_kernel;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       sampling_detail::kMaxSharedBytes));
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  setup.multiprocessors = current_multiprocessors();
  cudaLaunchAttribute attributes[2]{};
  SamplingLaunchParams widest = p;
  widest.vocab = max_sampling_vocab();
  const cudaLaunchConfig_t config = launch_config(widest, sampling_detail::kWideClusterCtas, attributes);
  int clusters = 0;
  setup.wide_clusters = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  cudaGetLastError();  // a refused query is an answer, not an error to report later
  setup.done = true;
  return setup;
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
  check(p.cluster_ctas == 0 || p.cluster_ctas == sampling_detail::kClusterCtas ||
            p.cluster_ctas == sampling_detail::kWideClusterCtas,
        "sampling: cluster_ctas ", p.cluster_ctas, " must be 0 (automatic), ", sampling_detail::kClusterCtas, " or ",
        sampling_detail::kWideClusterCtas);
}

void run_sampling(const SamplingLaunchParams& p) {
  check_sampling_params(p);
  const DeviceSetup& setup = device_setup(p);
  // Few rows leave most SMs idle with 8-CTA clusters: spread each row over 16 where they fit, unless a row's top_p
  // makes the wider exchange cost more than the spread saves.
  int cluster_ctas = p.cluster_ctas;
  if (cluster_ctas == 0) {
    const bool wide = !p.any_top_p && setup.wide_clusters &&
                      p.rows * sampling_detail::kWideClusterCtas <= setup.multiprocessors;
    cluster_ctas = wide ? sampling_detail::kWideClusterCtas : sampling_detail::kClusterCtas;
  }
  check(cluster_ctas != sampling_detail::kWideClusterCtas || setup.wide_clusters, "sampling: this GPU does not "
        "schedule clusters of ", cluster_ctas, " CTAs of the sampling kernel");
  cudaLaunchAttribute attributes[2]{};
  const cudaLaunchConfig_t config = launch_config(p, cluster_ctas, attributes);
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
