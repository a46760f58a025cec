// Run-time choice among the compiled (dtype, head_dim, mask) instantiations of the attention engine.
// CUDA builds only: the instantiations are .cu files.
#ifdef FLAMINGO_FAST_WITH_CUDA
#include "flamingo_fast/attention_launch.h"

namespace flamingo_fast {
namespace {

template <AttentionDType kDType, int kHeadDim>
cudaError_t fwd_for_mask(AttentionMaskKind mask, const AttentionFwdArgs& args, cudaStream_t stream) {
  switch (mask) {
    case AttentionMaskKind::kCausal: return run_attention_fwd<kDType, kHeadDim, AttentionMaskKind::kCausal>(args, stream);
    case AttentionMaskKind::kMedia: return run_attention_fwd<kDType, kHeadDim, AttentionMaskKind::kMedia>(args, stream);
    case AttentionMaskKind::kNone: return run_attention_fwd<kDType, kHeadDim, AttentionMaskKind::kNone>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <AttentionDType kDType, int kHeadDim>
cudaError_t bwd_for_mask(AttentionMaskKind mask, const AttentionBwdArgs& args, cudaStream_t stream) {
  switch (mask) {
    case AttentionMaskKind::kCausal: return run_attention_bwd<kDType, kHeadDim, AttentionMaskKind::kCausal>(args, stream);
    case AttentionMaskKind::kMedia: return run_attention_bwd<kDType, kHeadDim, AttentionMaskKind::kMedia>(args, stream);
    case AttentionMaskKind::kNone: return run_attention_bwd<kDType, kHeadDim, AttentionMaskKind::kNone>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <AttentionDType kDType>
cudaError_t fwd_for_dtype(AttentionMaskKind mask, const AttentionFwdArgs& args, cudaStream_t stream) {
  switch (args.problem.head_dim) {
    case 64: return fwd_for_mask<kDType, 64>(mask, args, stream);
    case 96: return fwd_for_mask<kDType, 96>(mask, args, stream);
    case 128: return fwd_for_mask<kDType, 128>(mask, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <AttentionDType kDType>
cudaError_t bwd_for_dtype(AttentionMaskKind mask, const AttentionBwdArgs& args, cudaStream_t stream) {
  switch (args.problem.head_dim) {
    case 64: return bwd_for_mask<kDType, 64>(mask, args, stream);
    case 96: return bwd_for_mask<kDType, 96>(mask, args, stream);
    case 128: return bwd_for_mask<kDType, 128>(mask, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_fwd_dispatch(AttentionDType dtype, AttentionMaskKind mask, const AttentionFwdArgs& args,
                                   cudaStream_t stream) {
  if (dtype == AttentionDType::kBFloat16) return fwd_for_dtype<AttentionDType::kBFloat16>(mask, args, stream);
#ifdef FLAMINGO_FAST_ATTENTION_FP16
  if (dtype == AttentionDType::kFloat16) return fwd_for_dtype<AttentionDType::kFloat16>(mask, args, stream);
#endif
  return cudaErrorInvalidValue;
}

cudaError_t attention_bwd_dispatch(AttentionDType dtype, AttentionMaskKind mask, const AttentionBwdArgs& args,
                                   cudaStream_t stream) {
  if (dtype == AttentionDType::kBFloat16) return bwd_for_dtype<AttentionDType::kBFloat16>(mask, args, stream);
#ifdef FLAMINGO_FAST_ATTENTION_FP16
  if (dtype == AttentionDType::kFloat16) return bwd_for_dtype<AttentionDType::kFloat16>(mask, args, stream);
#endif
  return cudaErrorInvalidValue;
}

}  // namespace flamingo_fast

#endif  // FLAMINGO_FAST_WITH_CUDA
