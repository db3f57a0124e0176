// The same-run floor of the GPU benchmarks: the device's measured device-to-device copy bandwidth, against which
// every kernel and end-to-end result is reported (performance.md).
#pragma once

#include <cuda_runtime.h>

namespace dsv4::cuda {

// Copy bandwidth of 1 GiB device to device on `stream`, read + write counted, in GB/s: 3 warm-up copies, then the
// mean of 10 timed between two events. Takes 2 GiB of device memory while it runs.
double measure_copy_bandwidth_gbps(cudaStream_t stream = nullptr);

}  // namespace dsv4::cuda
