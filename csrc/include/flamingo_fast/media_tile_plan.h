// Tile planning for the media cross-attention mask, shared by host and device code.
//
// Each text row carries a media index m (-1 before the first image) that never decreases along the
// row. A token with index m attends to the latents of image m, keys [m*L, (m+1)*L) ("only immediate"),
// or to images 0..m, keys [0, (m+1)*L) ("all previous"). Because the index is sorted, a query block
// needs one contiguous key range, and the rows that visit a key block form one contiguous range: the
// attention kernels use these ranges to skip every tile that is fully masked.
#pragma once

#include <cstdint>

#include "flamingo_fast/config.h"

namespace flamingo_fast {

// Half-open range [begin, end); empty when begin >= end.
struct IndexRange {
  int32_t begin;
  int32_t end;
};

struct MediaMaskShape {
  int32_t seq_len;            // text tokens per row
  int32_t num_keys;           // T_img * latents_per_media
  int32_t latents_per_media;  // L
  bool only_immediate;        // false: "all previous images"
};

// First position p in [0, n) with row[p] >= value (n if none). row is non-decreasing.
template <typename IndexT>
FF_HOST_DEVICE int32_t lower_bound(const IndexT* row, int32_t n, int64_t value) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(row[mid]) < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Keys that the query rows [q_begin, q_end) of one row must visit.
template <typename IndexT>
FF_HOST_DEVICE IndexRange query_block_key_range(const IndexT* row, MediaMaskShape shape, int32_t q_begin,
                                                int32_t q_end) {
  if (q_end > shape.seq_len) q_end = shape.seq_len;
  if (q_begin >= q_end) return {0, 0};
  const int64_t max_index = row[q_end - 1];
  if (max_index < 0) return {0, 0};  // every row still waits for its first image
  // The smallest valid index in the block is the first one that is >= 0.
  const int32_t first_valid = q_begin + lower_bound(row + q_begin, q_end - q_begin, 0);
  const int64_t min_index = row[first_valid];
  const int64_t L = shape.latents_per_media;
  const int64_t begin = shape.only_immediate ? min_index * L : 0;
  int64_t end = (max_index + 1) * L;
  if (end > shape.num_keys) end = shape.num_keys;  // an index past the images is rejected upstream
  return {static_cast<int32_t>(begin), static_cast<int32_t>(end)};
}

// Query rows that visit the keys [k_begin, k_end) of one row.
template <typename IndexT>
FF_HOST_DEVICE IndexRange key_block_query_range(const IndexT* row, MediaMaskShape shape, int32_t k_begin,
                                                int32_t k_end) {
  if (k_end > shape.num_keys) k_end = shape.num_keys;
  if (k_begin >= k_end) return {0, 0};
  const int64_t L = shape.latents_per_media;
  const int64_t first_image = k_begin / L;
  const int64_t last_image = (k_end - 1) / L;
  const int32_t begin = lower_bound(row, shape.seq_len, first_image);
  // "All previous": every later row (index >= first_image) also sees these keys.
  const int32_t end = shape.only_immediate ? lower_bound(row, shape.seq_len, last_image + 1) : shape.seq_len;
  if (begin >= end) return {0, 0};
  return {begin, end};
}

FF_HOST_DEVICE int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

// Plans one (row, block) pair: writes the key range of query block `block` (if it exists) and the query
// range of key block `block` (if it exists). Both host and device loops call this.
template <typename IndexT>
FF_HOST_DEVICE void plan_media_block(const IndexT* row, MediaMaskShape shape, int32_t block_q, int32_t block_k,
                                     int32_t block, IndexRange* q_plan_row, IndexRange* k_plan_row) {
  if (block < ceil_div(shape.seq_len, block_q)) {
    q_plan_row[block] = query_block_key_range(row, shape, block * block_q, (block + 1) * block_q);
  }
  if (block < ceil_div(shape.num_keys, block_k)) {
    k_plan_row[block] = key_block_query_range(row, shape, block * block_k, (block + 1) * block_k);
  }
}

}  // namespace flamingo_fast
