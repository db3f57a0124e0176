// TMA (the Hopper bulk tensor copy engine): host-side encoding of 2D tensor maps and the device-side load that
// completes on an mbarrier.
//
// The encoder comes from the driver through cudaGetDriverEntryPointByVersion, so nothing links against libcuda.
// A tensor map is 128 bytes of plain data: encoding one is a host computation (no allocation, no device call),
// and it reaches the kernel by value as a __grid_constant__ parameter, so launches stay graph-capturable.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda/ptx>
#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>

#include "core/error.hpp"

namespace dsv4::cuda::sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &query);
    check(status == cudaSuccess && query == cudaDriverEntryPointSuccess && function != nullptr,
          "TMA: the driver does not provide cuTensorMapEncodeTiled (", cudaGetErrorString(status), ")");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encoder;
}

struct TensorMap2d {
  CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_UINT8;
  const void* base = nullptr;  // 16-byte aligned global address
  uint64_t cols = 0;           // inner (contiguous) extent, in elements
  uint64_t rows = 0;
  uint64_t row_stride_bytes = 0;  // a multiple of 16
  uint32_t box_cols = 0;          // box_cols × element size: a multiple of 16 bytes (≤ 128 with the 128B swizzle)
  uint32_t box_rows = 0;          // ≤ 256
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE;
};

// Encodes a row-major 2D tensor; boxes reaching past the tensor are zero-filled on load. `what` names the tensor in
// the error.
inline CUtensorMap encode_tensor_map_2d(const TensorMap2d& t, std::string_view what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {t.cols, t.rows};
  const cuuint64_t strides[1] = {t.row_stride_bytes};
  const cuuint32_t box[2] = {t.box_cols, t.box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = tensor_map_encoder()(&map, t.type, 2, const_cast<void*>(t.base), dims, strides, box,
                                               element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, t.swizzle,
                                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(result == CUDA_SUCCESS, "TMA: cuTensorMapEncodeTiled failed (CUresult ", int(result), ") for ", what, " [",
        t.rows, " rows, ", t.cols, " cols, row stride ", t.row_stride_bytes, " bytes, box ", t.box_rows, " × ",
        t.box_cols, "]");
  return map;
}

// Asks the TMA unit to fetch the 128-byte descriptor early (it lives in kernel parameter space).
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Loads the box whose first element is (col, row) into shared memory; completion adds the box's bytes to the
// barrier's transaction count.
__device__ __forceinline__ void tma_load_2d(void* shared_dst, const CUtensorMap* map, uint64_t* barrier, int32_t col,
                                            int32_t row) {
  const int32_t coords[2] = {col, row};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_cluster, ::cuda::ptx::space_global, shared_dst, map, coords,
                                    barrier);
}

}  // namespace dsv4::cuda::sm90
