// Fused construction of the Perceiver resampler's key/value input (torch-free launcher interface):
//
//   kv[n, r]      = LayerNorm_media(media[n, r] + time_emb[r / tokens_per_frame])   r <  m  (media rows)
//   kv[n, m + j]  = LayerNorm_latents(latents[n, j])                                 j <  l  (latent rows)
//
// one warp per row, the row kept in registers, 16-byte loads and stores: one read of each input and one write
// of kv, instead of two LayerNorms, an add and a concatenation. The backward recomputes the row statistics
// and writes d_media / d_latents plus per-warp partial sums of the LayerNorm weight and bias gradients
// (the caller adds the partials in a fixed order, so the result is deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flamingo_fast {

enum class RowDType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct PerceiverKvInputArgs {
  RowDType dtype;
  int32_t batch;        // N (images x frames flattened by the caller)
  int32_t media_rows;   // m
  int32_t latent_rows;  // l
  int32_t dim;          // D, a multiple of 8, at most kPerceiverKvMaxDim
  const void* media;    // (N, m, D), rows contiguous, batch stride media_batch_stride
  const void* latents;  // (N, l, D), rows contiguous, batch stride latents_batch_stride (0: shared latents)
  int64_t media_batch_stride;
  int64_t latents_batch_stride;
  const void* time_emb;  // (frames, D) or null; media row r uses time_emb[r / tokens_per_frame]
  int32_t tokens_per_frame;
  const void* media_weight;  // LayerNorm parameters (D), same dtype as the rows
  const void* media_bias;
  const void* latents_weight;
  const void* latents_bias;
  float eps;
  void* kv;  // (N, m + l, D) contiguous
};

struct PerceiverKvInputGradArgs {
  PerceiverKvInputArgs forward;  // the forward's inputs (kv unused)
  const void* d_kv;              // (N, m + l, D) contiguous
  void* d_media;                 // (N, m, D) contiguous
  void* d_latents;               // (N, l, D) contiguous
  // Partial sums (float32): (media_warps, 2, D) for the media LayerNorm [weight; bias], then
  // (latent_warps, 2, D) for the latents LayerNorm.
  float* partials;
  int32_t media_warps;
  int32_t latent_warps;
};

inline constexpr int32_t kPerceiverKvMaxDim = 2048;

// Number of warps the backward uses for `rows` rows (the partial-sum buffer has this many slots).
int32_t perceiver_kv_input_bwd_warps(int64_t rows, int32_t num_sms);

cudaError_t launch_perceiver_kv_input_fwd(const PerceiverKvInputArgs& args, cudaStream_t stream);
cudaError_t launch_perceiver_kv_input_bwd(const PerceiverKvInputGradArgs& args, cudaStream_t stream);

}  // namespace flamingo_fast
