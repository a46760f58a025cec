// CTest: the attention engine's mask policies (csrc/include/flamingo_fast/attention_masks.h) against a
// brute-force scan of each mask: every visible (query, key) pair must lie inside the planned key range of its
// query tile and the planned query range of its key tile; "full" key ranges and "no mask needed" answers
// must only cover visible pairs; row_keys must match the definition of each mask exactly.
#include <cstdio>
#include <random>
#include <vector>

#include "flamingo_fast/attention_masks.h"

using namespace flamingo_fast;

namespace {

int failures = 0;

void fail(const char* mask, int trial, const char* what, int a, int b) {
  if (failures < 20) std::fprintf(stderr, "%s trial %d: %s (%d, %d)\n", mask, trial, what, a, b);
  ++failures;
}

// The definition of each mask, written independently of the policies.
bool causal_visible(int q, int k, int sq, int sk) { return q < sq && k < sk && k <= q + (sk - sq); }

bool media_visible(const std::vector<int32_t>& row, int q, int k, int sk, int latents, bool only_immediate) {
  if (q >= static_cast<int>(row.size()) || k >= sk || row[q] < 0) return false;
  const int image = k / latents;
  return only_immediate ? image == row[q] : image <= row[q];
}

template <class Mask, class Visible>
void check_policy(const char* name, int trial, const MaskContext& c, int block_q, int block_k, Visible visible) {
  const int sq = c.seqlen_q, sk = c.seqlen_k;
  for (int q0 = 0; q0 < sq; q0 += block_q) {
    const QueryTilePlan plan = Mask::plan_query_tile(c, 0, q0, q0 + block_q);
    for (int q = q0; q < q0 + block_q && q < sq; ++q) {
      const IndexRange keys = Mask::row_keys(c, 0, q);
      for (int k = 0; k < sk; ++k) {
        const bool want = visible(q, k);
        if ((keys.begin <= k && k < keys.end) != want) fail(name, trial, "row_keys disagrees at (q, k)", q, k);
        if (want && !(plan.key_begin <= k && k < plan.key_end)) fail(name, trial, "visible key outside plan", q, k);
        if (plan.full_begin <= k && k < plan.full_end && !want) fail(name, trial, "masked key in full range", q, k);
      }
    }
  }
  for (int k0 = 0; k0 < sk; k0 += block_k) {
    const IndexRange queries = Mask::key_tile_queries(c, 0, k0, k0 + block_k);
    for (int k = k0; k < k0 + block_k && k < sk; ++k) {
      for (int q = 0; q < sq; ++q) {
        if (visible(q, k) && !(queries.begin <= q && q < queries.end)) {
          fail(name, trial, "visible query outside key-tile plan", q, k);
        }
      }
    }
    // Query steps that need no element mask: every valid (query, key) pair is visible.
    for (int q0 = 0; q0 < sq; q0 += 32) {
      if (Mask::key_tile_needs_mask(c, 0, q0, q0 + 32, k0, k0 + block_k)) continue;
      for (int q = q0; q < q0 + 32 && q < sq; ++q) {
        for (int k = k0; k < k0 + block_k && k < sk; ++k) {
          if (!visible(q, k)) fail(name, trial, "unmasked step holds a masked pair", q, k);
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(4321);
  for (int trial = 0; trial < 400; ++trial) {
    const int sq = 1 + rng() % 200;
    const int sk = 1 + rng() % 200;
    const int block_q = 16 << (rng() % 4);
    const int block_k = 16 << (rng() % 4);

    MaskContext c{sq, sk, {}};
    check_policy<CausalMask>("causal", trial, c, block_q, block_k,
                             [&](int q, int k) { return causal_visible(q, k, sq, sk); });
    check_policy<NoMask>("none", trial, c, block_q, block_k, [&](int q, int k) { return q < sq && k < sk; });

    // Media: a random non-decreasing row, keys = images * latents.
    const int latents = 1 + rng() % 70;
    const int images = rng() % 5;  // 0 images: every row sees nothing
    std::vector<int32_t> row(sq);
    int32_t index = (rng() % 3 == 0 && images > 0) ? 0 : -1;
    for (auto& value : row) {
      if (rng() % 9 == 0 && index + 1 < images) ++index;
      value = index;
    }
    MaskContext media{sq, images * latents, {}};
    media.media.media_index = row.data();
    media.media.latents_per_media = latents;
    for (bool only_immediate : {true, false}) {
      media.media.only_immediate = only_immediate;
      check_policy<MediaMask>(only_immediate ? "media" : "media-all-previous", trial, media, block_q, block_k,
                              [&](int q, int k) {
                                return media_visible(row, q, k, images * latents, latents, only_immediate);
                              });
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("attention mask policies: ok\n");
  return 0;
}
