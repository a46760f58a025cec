// CTest: the media tile planner (host path of csrc/include/flamingo_fast/media_tile_plan.h) against a
// brute-force scan of the mask, on random non-decreasing media patterns.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "flamingo_fast/media_tile_plan.h"

using flamingo_fast::IndexRange;
using flamingo_fast::MediaMaskShape;

namespace {

bool visible(int64_t index, int32_t key, int32_t latents, bool only_immediate) {
  if (index < 0) return false;
  const int64_t image = key / latents;
  return only_immediate ? image == index : image <= index;
}

// Tightest [begin, end) covering the positions where pred holds ({0, 0} if none).
template <typename Pred>
IndexRange hull(int32_t n, Pred pred) {
  IndexRange range{0, 0};
  bool any = false;
  for (int32_t i = 0; i < n; ++i) {
    if (!pred(i)) continue;
    if (!any) range.begin = i;
    range.end = i + 1;
    any = true;
  }
  return range;
}

int failures = 0;

void expect_equal(IndexRange got, IndexRange want, const char* what, int trial, int block) {
  const bool both_empty = got.begin >= got.end && want.begin >= want.end;
  if (both_empty || (got.begin == want.begin && got.end == want.end)) return;
  std::fprintf(stderr, "trial %d %s block %d: got [%d, %d) want [%d, %d)\n", trial, what, block, got.begin, got.end,
               want.begin, want.end);
  ++failures;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    const int32_t seq_len = 1 + rng() % 300;
    const int32_t latents = 1 + rng() % 70;
    const int32_t num_images = 1 + rng() % 8;
    const int32_t block_q = 1 + rng() % 130;
    const int32_t block_k = 1 + rng() % 130;
    const bool only_immediate = rng() % 2;
    // Random non-decreasing row: leading text (-1), then images advancing at random positions.
    std::vector<int64_t> row(seq_len);
    int64_t index = (rng() % 3 == 0) ? 0 : -1;
    for (auto& value : row) {
      if (rng() % 7 == 0 && index + 1 < num_images) index += 1 + (rng() % 3 == 0 && index + 2 < num_images);
      value = index;
    }
    const MediaMaskShape shape{seq_len, num_images * latents, latents, only_immediate};
    const int32_t num_q_blocks = flamingo_fast::ceil_div(seq_len, block_q);
    const int32_t num_k_blocks = flamingo_fast::ceil_div(shape.num_keys, block_k);
    std::vector<IndexRange> q_plan(num_q_blocks), k_plan(num_k_blocks);
    for (int32_t block = 0; block < std::max(num_q_blocks, num_k_blocks); ++block) {
      flamingo_fast::plan_media_block(row.data(), shape, block_q, block_k, block, q_plan.data(), k_plan.data());
    }
    for (int32_t qb = 0; qb < num_q_blocks; ++qb) {
      const int32_t q0 = qb * block_q, q1 = std::min(seq_len, q0 + block_q);
      const IndexRange want = hull(shape.num_keys, [&](int32_t key) {
        for (int32_t q = q0; q < q1; ++q) if (visible(row[q], key, latents, only_immediate)) return true;
        return false;
      });
      expect_equal(q_plan[qb], want, "query", trial, qb);
    }
    for (int32_t kb = 0; kb < num_k_blocks; ++kb) {
      const int32_t k0 = kb * block_k, k1 = std::min(shape.num_keys, k0 + block_k);
      const IndexRange want = hull(seq_len, [&](int32_t q) {
        for (int32_t key = k0; key < k1; ++key) if (visible(row[q], key, latents, only_immediate)) return true;
        return false;
      });
      expect_equal(k_plan[kb], want, "key", trial, kb);
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("media tile plan: 2000 random patterns agree with the brute-force mask\n");
  return EXIT_SUCCESS;
}
