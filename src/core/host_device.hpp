// Marks functions shared by host code and CUDA kernels (format codecs, small math) so both use one definition.
#pragma once

#if defined(__CUDACC__)
#define DSV4_HD __host__ __device__ __forceinline__
#else
#define DSV4_HD inline
#endif
