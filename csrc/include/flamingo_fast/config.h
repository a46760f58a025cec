// Portability macros shared by host (.cpp) and device (.cu) code.
#pragma once

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif
