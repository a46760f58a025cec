// Online softmax over wgmma score fragments (rows x keys, see accumulator_rowcol), in the log2 domain.
//
// row_max holds max_j(s_ij * scale_log2) so far (-inf while a row has seen no key). Masked scores are
// `masked_score` (-inf for a positive scale, +inf for a negative one), so `s * scale_log2` of a masked
// score is -inf either way and its probability is exactly 0. Rows that never see a key keep sum 0 and
// finish with output 0 and lse -inf, never NaN.
#pragma once

#include "kernel_common.cuh"

namespace flamingo_fast::attention {

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's partial sums; reduced over the quad in finalize()

  CUTE_DEVICE void reset() {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Replaces the scores by unnormalised probabilities exp2(s * scale_log2 - row_max) and returns in
  // `correction` the factor exp2(old_max - new_max) that the output accumulator must be multiplied by.
  template <class Scores>
  CUTE_DEVICE void exponentiate(Scores& scores, float scale_log2, bool negative_scale, float (&correction)[kRows]) {
    static_assert(decltype(size<0>(scores))::value == kRows);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      // The largest scaled score is the largest raw score for a positive scale, the smallest otherwise.
      float extreme = scores(r, 0);
      if (negative_scale) {
        CUTE_UNROLL
        for (int c = 1; c < size<1>(scores); ++c) extreme = fminf(extreme, scores(r, c));
        extreme = quad_min(extreme);
      } else {
        CUTE_UNROLL
        for (int c = 1; c < size<1>(scores); ++c) extreme = fmaxf(extreme, scores(r, c));
        extreme = quad_max(extreme);
      }
      const float new_max = fmaxf(row_max[r], extreme * scale_log2);
      const float offset = new_max == -INFINITY ? 0.f : new_max;
      correction[r] = exp2f(row_max[r] - offset);
      row_max[r] = new_max;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float p = exp2f(fmaf(scores(r, c), scale_log2, -offset));
        scores(r, c) = p;
        sum += p;
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
  }

  // 1 / row sum (0 for rows without keys) and the natural-log LSE (-inf for rows without keys).
  CUTE_DEVICE void finalize(float (&inv_sum)[kRows], float (&lse)[kRows]) const {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool has_keys = sum > 0.f;
      inv_sum[r] = has_keys ? 1.f / sum : 0.f;
      lse[r] = has_keys ? (row_max[r] + __log2f(sum)) * kLn2 : -INFINITY;
    }
  }
};

template <class Acc, int kRows>
CUTE_DEVICE void scale_rows(Acc& acc, const float (&factor)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc); ++c) acc(r, c) *= factor[r];
  }
}

// Sets scores outside each row's key interval [lo, hi) to `masked_score`; `key0` is the block's first key.
template <class Scores, class Coords, int kRows>
CUTE_DEVICE void mask_scores(Scores& scores, Coords const& coords, int32_t key0, const int32_t (&lo)[kRows],
                             const int32_t (&hi)[kRows], float masked_score) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const int32_t key = key0 + get<1>(coords(r, c));
      if (key < lo[r] || key >= hi[r]) scores(r, c) = masked_score;
    }
  }
}

}  // namespace flamingo_fast::attention
