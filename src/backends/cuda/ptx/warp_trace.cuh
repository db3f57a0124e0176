// Traced launches (bench --trace): each warp of a (blockIdx.y, blockIdx.x) grid owns a record of timestamp slots.
#pragma once

#include <cstdint>

namespace dsv4::cuda::sm90 {

// Lane 0 of the calling warp stores %globaltimer (ns) in slot `slot` of its warp's record (`slots_per_warp` words per
// warp, `warps_per_cta` warps per CTA); at `start_slot` it also stores the SM id in `sm_slot`. The other lanes return.
__device__ __forceinline__ void record_warp_trace_point(uint64_t* trace, int warps_per_cta, int slots_per_warp,
                                                        int slot, int start_slot, int sm_slot) {
  if (threadIdx.x % 32 != 0) return;
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  const uint64_t warp = (uint64_t(blockIdx.y) * gridDim.x + blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  uint64_t* record = trace + warp * slots_per_warp;
  if (slot == start_slot) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    record[sm_slot] = sm;
  }
  record[slot] = now;
}

}  // namespace dsv4::cuda::sm90
