// Defines run_attention_fwd<dtype, head_dim, mask> on top of the forward kernel; included only by the
// per-instantiation .cu files under instantiations/.
#pragma once

#include "attention_fwd.cuh"
#include "flamingo_fast/attention_launch.h"

namespace flamingo_fast {

template <AttentionDType kDType, int kHeadDim, AttentionMaskKind kMask>
cudaError_t run_attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream) {
  using Element = typename attention::ElementOf<kDType>::type;
  using Mask = typename attention::MaskOf<kMask>::type;
  return attention::launch_attention_fwd<Element, kHeadDim, Mask>(args, stream);
}

}  // namespace flamingo_fast
