// Mask policies of the attention engine (host + device, no CuTe).
//
// Each policy answers, for one batch row:
//   plan_query_tile(q0, q1)   keys that query rows [q0, q1) must visit, and the keys that every one of those
//                             rows sees (blocks inside need no element mask)            forward / dQ
//   key_tile_queries(k0, k1)  query rows that see at least one of keys [k0, k1)          dK / dV
//   row_keys(q)               the keys [lo, hi) that query row q sees (empty: no key; out = 0, lse = -inf)
//   key_tile_needs_mask(...)  whether a (query block, key tile) pair of the dK/dV kernel has masked pairs
// Every visible key range is one interval per row, so the element mask is `lo <= key < hi` for all policies.
#pragma once

#include <cstdint>

#include "flamingo_fast/attention_params.h"
#include "flamingo_fast/config.h"
#include "flamingo_fast/media_tile_plan.h"

namespace flamingo_fast {

struct MaskContext {
  int32_t seqlen_q;
  int32_t seqlen_k;
  MediaMaskParams media;
};

struct QueryTilePlan {
  int32_t key_begin;   // keys [key_begin, key_end) hold every key some row of the tile sees
  int32_t key_end;
  int32_t full_begin;  // keys [full_begin, full_end) are seen by every row of the tile
  int32_t full_end;
};

FF_HOST_DEVICE int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
FF_HOST_DEVICE int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

// Causal, bottom-right aligned: query q sees keys k <= q + (seqlen_k - seqlen_q). Rows with a negative limit
// (seqlen_q > seqlen_k) see no key.
struct CausalMask {
  static constexpr AttentionMaskKind kKind = AttentionMaskKind::kCausal;

  FF_HOST_DEVICE static QueryTilePlan plan_query_tile(const MaskContext& c, int32_t /*batch*/, int32_t q0,
                                                      int32_t q1) {
    q1 = min_i32(q1, c.seqlen_q);
    const int32_t offset = c.seqlen_k - c.seqlen_q;
    if (q0 >= q1) return {0, 0, 0, 0};
    const int32_t key_end = min_i32(c.seqlen_k, q1 + offset);  // the last row sees keys < q1 - 1 + offset + 1
    if (key_end <= 0) return {0, 0, 0, 0};
    const int32_t full_end = max_i32(0, min_i32(key_end, q0 + offset + 1));
    return {0, key_end, 0, full_end};
  }

  FF_HOST_DEVICE static IndexRange key_tile_queries(const MaskContext& c, int32_t /*batch*/, int32_t k0, int32_t k1) {
    k1 = min_i32(k1, c.seqlen_k);
    if (k0 >= k1) return {0, 0};
    const int32_t begin = max_i32(0, k0 - (c.seqlen_k - c.seqlen_q));
    if (begin >= c.seqlen_q) return {0, 0};
    return {begin, c.seqlen_q};
  }

  FF_HOST_DEVICE static IndexRange row_keys(const MaskContext& c, int32_t /*batch*/, int32_t q) {
    if (q < 0 || q >= c.seqlen_q) return {0, 0};
    const int32_t hi = min_i32(c.seqlen_k, q + (c.seqlen_k - c.seqlen_q) + 1);
    return {0, max_i32(hi, 0)};
  }

  // Rows are keys [k0, k1) and columns queries [q0, q1). Keys >= seqlen_k and queries >= seqlen_q are
  // harmless there (their dK/dV rows are never stored; padded queries have lse = +inf, so P = 0).
  FF_HOST_DEVICE static bool key_tile_needs_mask(const MaskContext& c, int32_t /*batch*/, int32_t q0,
                                                 int32_t /*q1*/, int32_t /*k0*/, int32_t k1) {
    return k1 - 1 > q0 + (c.seqlen_k - c.seqlen_q);
  }
};

// Media cross-attention: query q with media index m >= 0 sees the latents of image m, keys [m*L, (m+1)*L)
// ("only immediate"), or of images 0..m, keys [0, (m+1)*L) ("all previous"); m = -1 sees nothing.
struct MediaMask {
  static constexpr AttentionMaskKind kKind = AttentionMaskKind::kMedia;

  FF_HOST_DEVICE static MediaMaskShape shape(const MaskContext& c) {
    return {c.seqlen_q, c.seqlen_k, c.media.latents_per_media, c.media.only_immediate};
  }

  FF_HOST_DEVICE static const int32_t* row(const MaskContext& c, int32_t batch) {
    return c.media.media_index + static_cast<int64_t>(batch) * c.seqlen_q;
  }

  FF_HOST_DEVICE static IndexRange image_keys(const MaskContext& c, int64_t image) {
    if (image < 0) return {0, 0};
    const int64_t latents = c.media.latents_per_media;
    int64_t hi = (image + 1) * latents;
    if (hi > c.seqlen_k) hi = c.seqlen_k;
    const int64_t lo = c.media.only_immediate ? image * latents : 0;
    if (lo >= hi) return {0, 0};
    return {static_cast<int32_t>(lo), static_cast<int32_t>(hi)};
  }

  FF_HOST_DEVICE static QueryTilePlan plan_query_tile(const MaskContext& c, int32_t batch, int32_t q0, int32_t q1) {
    const int32_t q_last = min_i32(q1, c.seqlen_q);
    if (q0 >= q_last) return {0, 0, 0, 0};
    const int32_t* index = row(c, batch);
    IndexRange keys;
    if (c.media.q_plan != nullptr) {
      keys = c.media.q_plan[static_cast<int64_t>(batch) * c.media.q_plan_blocks + q0 / c.media.plan_block_q];
    } else {
      keys = query_block_key_range(index, shape(c), q0, q1);
    }
    if (keys.begin >= keys.end) return {0, 0, 0, 0};
    // Every row sees the same keys when the first and last rows share an image (the index never decreases).
    const int32_t first = index[q0];
    IndexRange full = {0, 0};
    if (first >= 0 && first == index[q_last - 1]) full = image_keys(c, first);
    return {keys.begin, keys.end, full.begin, full.end};
  }

  FF_HOST_DEVICE static IndexRange key_tile_queries(const MaskContext& c, int32_t batch, int32_t k0, int32_t k1) {
    if (c.media.k_plan != nullptr) {
      return c.media.k_plan[static_cast<int64_t>(batch) * c.media.k_plan_blocks + k0 / c.media.plan_block_k];
    }
    return key_block_query_range(row(c, batch), shape(c), k0, k1);
  }

  FF_HOST_DEVICE static IndexRange row_keys(const MaskContext& c, int32_t batch, int32_t q) {
    if (q < 0 || q >= c.seqlen_q) return {0, 0};
    return image_keys(c, row(c, batch)[q]);
  }

  FF_HOST_DEVICE static bool key_tile_needs_mask(const MaskContext&, int32_t, int32_t, int32_t, int32_t, int32_t) {
    return true;
  }
};

// No mask (Perceiver resampler, non-causal attention): every query sees every key.
struct NoMask {
  static constexpr AttentionMaskKind kKind = AttentionMaskKind::kNone;

  FF_HOST_DEVICE static QueryTilePlan plan_query_tile(const MaskContext& c, int32_t, int32_t q0, int32_t q1) {
    if (q0 >= min_i32(q1, c.seqlen_q) || c.seqlen_k <= 0) return {0, 0, 0, 0};
    return {0, c.seqlen_k, 0, c.seqlen_k};
  }

  FF_HOST_DEVICE static IndexRange key_tile_queries(const MaskContext& c, int32_t, int32_t k0, int32_t k1) {
    if (k0 >= min_i32(k1, c.seqlen_k) || c.seqlen_q <= 0) return {0, 0};
    return {0, c.seqlen_q};
  }

  FF_HOST_DEVICE static IndexRange row_keys(const MaskContext& c, int32_t, int32_t q) {
    if (q < 0 || q >= c.seqlen_q) return {0, 0};
    return {0, c.seqlen_k};
  }

  FF_HOST_DEVICE static bool key_tile_needs_mask(const MaskContext&, int32_t, int32_t, int32_t, int32_t, int32_t) {
    return false;
  }
};

}  // namespace flamingo_fast
