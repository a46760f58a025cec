// Entry points of the Hopper attention engine (torch-free): one explicit instantiation per
// (dtype, head_dim, mask, direction) lives in csrc/attention/instantiations/, and attention_dispatch()
// picks one at run time. All launches are asynchronous on `stream`.
#pragma once

#include <cuda_runtime.h>

#include "flamingo_fast/attention_params.h"

namespace flamingo_fast {

template <AttentionDType kDType, int kHeadDim, AttentionMaskKind kMask>
cudaError_t run_attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream);

template <AttentionDType kDType, int kHeadDim, AttentionMaskKind kMask>
cudaError_t run_attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream);

// fp16 kernels double the build; they are compiled only with FLAMINGO_FAST_ATTENTION_FP16 defined.
constexpr bool attention_fp16_built() {
#ifdef FLAMINGO_FAST_ATTENTION_FP16
  return true;
#else
  return false;
#endif
}

constexpr bool attention_head_dim_supported(int head_dim) {
  return head_dim == 64 || head_dim == 96 || head_dim == 128;
}

// cudaErrorInvalidValue when (dtype, head_dim) has no compiled kernel.
cudaError_t attention_fwd_dispatch(AttentionDType dtype, AttentionMaskKind mask, const AttentionFwdArgs& args,
                                   cudaStream_t stream);
cudaError_t attention_bwd_dispatch(AttentionDType dtype, AttentionMaskKind mask, const AttentionBwdArgs& args,
                                   cudaStream_t stream);

}  // namespace flamingo_fast
