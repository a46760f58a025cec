// Backward preprocess: per query row, D = sum_d(dout * out) and lse * log2(e), written to row workspaces
// (batch, heads_q, seqlen_q_padded). Padding rows and rows without keys get lse_log2 = +inf, so every
// probability exp2(s * scale_log2 - lse_log2) the backward kernels recompute for them is exactly 0.
// Memory-bound: 16-byte loads, 16 lanes per row, a shuffle reduction.
#pragma once

#include "kernel_common.cuh"

namespace flamingo_fast::attention {

struct PreprocessParams {
  const void* out;
  const void* dout;
  BshdStrides out_strides;
  BshdStrides dout_strides;
  const float* lse;
  float* lse_log2;
  float* dpsum;
  int32_t heads;
  int32_t seqlen_q;
  int32_t seqlen_q_padded;
  int64_t num_rows;  // batch * heads * seqlen_q_padded
};

inline constexpr int kPreprocessLanesPerRow = 16;
inline constexpr int kPreprocessThreads = 256;

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(kPreprocessThreads) attention_bwd_preprocess_kernel(PreprocessParams const p) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static_assert(kChunks <= kPreprocessLanesPerRow);
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kPreprocessThreads + threadIdx.x) / kPreprocessLanesPerRow;
  const int lane = threadIdx.x % kPreprocessLanesPerRow;
  const bool active = row < p.num_rows;  // no early return: the whole warp takes part in the shuffles
  const int32_t q = static_cast<int32_t>(row % p.seqlen_q_padded);
  const int64_t bh = row / p.seqlen_q_padded;
  const int32_t head = static_cast<int32_t>(bh % p.heads);
  const int32_t batch = static_cast<int32_t>(bh / p.heads);

  float dot = 0.f;
  if (active && q < p.seqlen_q && lane < kChunks) {
    const auto* out = static_cast<const Element*>(p.out) + batch * p.out_strides.batch + q * p.out_strides.row +
                      head * p.out_strides.head + lane * 8;
    const auto* dout = static_cast<const Element*>(p.dout) + batch * p.dout_strides.batch +
                       q * p.dout_strides.row + head * p.dout_strides.head + lane * 8;
    const uint4 o_bits = *reinterpret_cast<const uint4*>(out);
    const uint4 d_bits = *reinterpret_cast<const uint4*>(dout);
    const auto* o = reinterpret_cast<const Element*>(&o_bits);
    const auto* d = reinterpret_cast<const Element*>(&d_bits);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) dot += static_cast<float>(o[i]) * static_cast<float>(d[i]);
  }
  CUTE_UNROLL
  for (int offset = kPreprocessLanesPerRow / 2; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  }
  if (active && lane == 0) {
    float lse_log2 = INFINITY;
    if (q < p.seqlen_q) {
      const float lse = p.lse[bh * p.seqlen_q + q];
      if (lse != -INFINITY) lse_log2 = lse * kLog2e;
    }
    p.lse_log2[row] = lse_log2;
    p.dpsum[row] = q < p.seqlen_q ? dot : 0.f;
  }
}

template <class Element, int kHeadDim>
cudaError_t launch_attention_bwd_preprocess(const AttentionBwdArgs& args, cudaStream_t stream) {
  const AttentionProblem& pr = args.problem;
  PreprocessParams params{args.out,
                          args.dout,
                          args.out_strides,
                          args.dout_strides,
                          args.lse,
                          args.lse_log2,
                          args.dpsum,
                          pr.heads_q,
                          pr.seqlen_q,
                          args.seqlen_q_padded,
                          static_cast<int64_t>(pr.batch) * pr.heads_q * args.seqlen_q_padded};
  if (params.num_rows == 0) return cudaSuccess;
  constexpr int kRowsPerBlock = kPreprocessThreads / kPreprocessLanesPerRow;
  const int64_t blocks = (params.num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  attention_bwd_preprocess_kernel<Element, kHeadDim>
      <<<static_cast<unsigned>(blocks), kPreprocessThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flamingo_fast::attention
