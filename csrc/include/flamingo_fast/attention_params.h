// Arguments of the Hopper attention kernels: plain pointers, sizes and strides (no torch, no CuTe), so the
// bindings (.cpp), the kernels (.cu) and host tests share one definition.
//
// All tensors are BSHD (batch, seq, heads, head_dim) with a contiguous last dimension; the other strides are
// free (in elements) but must be multiples of 16 bytes, because the kernels load tiles with TMA.
#pragma once

#include <cstdint>

#include "flamingo_fast/media_tile_plan.h"

namespace flamingo_fast {

enum class AttentionDType : int32_t { kBFloat16 = 0, kFloat16 = 1 };

// Which mask policy a kernel is specialised for (see attention_masks.h).
enum class AttentionMaskKind : int32_t { kCausal = 0, kMedia = 1, kNone = 2 };

// Element strides of a BSHD tensor; the head_dim stride is 1.
struct BshdStrides {
  int64_t batch;
  int64_t row;
  int64_t head;
};

struct AttentionProblem {
  int32_t batch;
  int32_t seqlen_q;
  int32_t seqlen_k;
  int32_t heads_q;
  int32_t heads_kv;  // heads_q % heads_kv == 0 (grouped-query attention)
  int32_t head_dim;
};

// The media mask's inputs. media_index is int32 (batch, seqlen_q) with row stride seqlen_q. q_plan/k_plan
// (optional: the kernels fall back to binary searches when null) are the tile plans of media_tile_plan.h,
// made with block sizes plan_block_q / plan_block_k.
struct MediaMaskParams {
  const int32_t* media_index = nullptr;
  const IndexRange* q_plan = nullptr;
  const IndexRange* k_plan = nullptr;
  int32_t plan_block_q = 0;
  int32_t plan_block_k = 0;
  int32_t q_plan_blocks = 0;  // per batch row
  int32_t k_plan_blocks = 0;
  int32_t latents_per_media = 1;
  bool only_immediate = true;
};

struct AttentionFwdArgs {
  AttentionProblem problem;
  const void* q;
  const void* k;
  const void* v;
  BshdStrides q_strides, k_strides, v_strides;
  void* out;
  BshdStrides out_strides;
  float* lse;  // (batch, heads_q, seqlen_q) contiguous, natural log; -inf for rows that see no key
  float softmax_scale;
  MediaMaskParams media;
  int32_t num_sms;  // persistent grid size
};

struct AttentionBwdArgs {
  AttentionProblem problem;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  BshdStrides q_strides, k_strides, v_strides, out_strides, dout_strides;
  const float* lse;  // (batch, heads_q, seqlen_q) contiguous, as written by the forward
  void* dq;
  void* dk;
  void* dv;
  BshdStrides dq_strides, dk_strides, dv_strides;
  // Workspaces (batch, heads_q, seqlen_q_padded) float32, written by the preprocess kernel:
  // lse * log2(e) (+inf for rows without keys and padding rows) and D = rowsum(dout * out) (0 on padding).
  float* lse_log2;
  float* dpsum;
  int32_t seqlen_q_padded;  // multiple of kAttentionRowPadding
  float softmax_scale;
  MediaMaskParams media;
  int32_t num_sms;
};

// Padding of the backward row workspaces: every query tile of every kernel lies inside it.
inline constexpr int32_t kAttentionRowPadding = 128;

// Tile sizes per mask policy, shared by the kernels and the host code that plans media tiles.
struct AttentionTiles {
  int32_t fwd_block_m;   // query rows per forward tile (64 per consumer warpgroup)
  int32_t fwd_block_n;   // keys per forward iteration
  int32_t dq_block_m;    // query rows per dQ tile
  int32_t dq_block_n;    // keys per dQ iteration
  int32_t dkdv_block_n;  // keys per dK/dV tile
  int32_t dkdv_block_m;  // query rows per dK/dV iteration
};

constexpr AttentionTiles attention_tiles(AttentionMaskKind mask) {
  switch (mask) {
    // Causal LM attention: long sequences, 128x128 tiles, two consumer warpgroups.
    case AttentionMaskKind::kCausal: return {128, 128, 128, 64, 128, 64};
    // Media cross-attention: a query tile usually needs one or two images of 64 latents, so 64-key steps
    // waste less work on masked keys.
    case AttentionMaskKind::kMedia: return {128, 64, 128, 64, 128, 64};
    // Perceiver resampler: 64 latent queries per (image, head), one consumer warpgroup per tile.
    case AttentionMaskKind::kNone: return {64, 128, 64, 64, 128, 64};
  }
  return {128, 128, 128, 64, 128, 64};
}

}  // namespace flamingo_fast
