// Defines run_attention_bwd<dtype, head_dim, mask>: preprocess (D, lse_log2), then the dQ pass and the
// dK/dV pass, all on `stream`. Included only by the per-instantiation .cu files under instantiations/.
#pragma once

#include "attention_bwd_dkdv.cuh"
#include "attention_bwd_dq.cuh"
#include "attention_bwd_preprocess.cuh"
#include "flamingo_fast/attention_launch.h"

namespace flamingo_fast {

template <AttentionDType kDType, int kHeadDim, AttentionMaskKind kMask>
cudaError_t run_attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream) {
  using Element = typename attention::ElementOf<kDType>::type;
  using Mask = typename attention::MaskOf<kMask>::type;
  cudaError_t status = attention::launch_attention_bwd_preprocess<Element, kHeadDim>(args, stream);
  if (status != cudaSuccess) return status;
  status = attention::launch_attention_bwd_dq<Element, kHeadDim, Mask>(args, stream);
  if (status != cudaSuccess) return status;
  return attention::launch_attention_bwd_dkdv<Element, kHeadDim, Mask>(args, stream);
}

}  // namespace flamingo_fast
