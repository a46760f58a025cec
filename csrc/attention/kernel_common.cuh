// Device building blocks shared by the attention kernels: element types, shared-memory tile layouts, wgmma
// issue helpers, accumulator views, barriers and the persistent tile scheduler. CuTe/CUTLASS are used as a
// library (GMMA atoms, TMA atoms, mbarrier wrappers); the attention logic is this project's own.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/array.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "flamingo_fast/attention_masks.h"
#include "flamingo_fast/attention_params.h"

namespace flamingo_fast::attention {

using namespace cute;

template <AttentionDType kDType>
struct ElementOf;
template <>
struct ElementOf<AttentionDType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct ElementOf<AttentionDType::kFloat16> {
  using type = cutlass::half_t;
};

template <AttentionMaskKind kKind>
struct MaskOf;
template <>
struct MaskOf<AttentionMaskKind::kCausal> {
  using type = CausalMask;
};
template <>
struct MaskOf<AttentionMaskKind::kMedia> {
  using type = MediaMask;
};
template <>
struct MaskOf<AttentionMaskKind::kNone> {
  using type = NoMask;
};

inline constexpr int kWarpGroupThreads = 128;
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------------
// Shared-memory tiles. Every tile is stored the way TMA loads it from a BSHD tensor: rows x head_dim with
// head_dim contiguous (K-major for GEMMs that contract over head_dim), in the widest swizzle the row allows.
// GEMMs that contract over the rows instead (P V, dS K, P^T dO, dS^T Q) read the same bytes through a
// transposed view, which wgmma consumes as an MN-major operand.

template <class Element, int kCols>
CUTE_HOST_DEVICE constexpr auto kmajor_smem_atom() {
  if constexpr (kCols % 64 == 0) {
    return GMMA::Layout_K_SW128_Atom<Element>{};
  } else if constexpr (kCols % 32 == 0) {
    return GMMA::Layout_K_SW64_Atom<Element>{};
  } else {
    static_assert(kCols % 16 == 0, "head_dim must be a multiple of 16");
    return GMMA::Layout_K_SW32_Atom<Element>{};
  }
}

// (rows, cols, stages)
template <class Element, int kRows, int kCols, int kStages>
using SmemTileLayout =
    decltype(tile_to_shape(kmajor_smem_atom<Element, kCols>(), Shape<Int<kRows>, Int<kCols>, Int<kStages>>{}));

// (cols, rows, stages) view of a (rows, cols, stages) tile.
template <class SmemLayout>
CUTE_HOST_DEVICE constexpr auto transposed_smem_layout(SmemLayout const& layout) {
  constexpr int kRows = size<0>(SmemLayout{});
  constexpr int kCols = size<1>(SmemLayout{});
  constexpr int kStages = size<2>(SmemLayout{});
  return composition(layout, make_layout(Shape<Int<kCols>, Int<kRows>, Int<kStages>>{},
                                         Stride<Int<kRows>, _1, Int<kRows * kCols>>{}));
}

// ---------------------------------------------------------------------------------------------------------
// Global tensors as TMA sees them: (seq, head_dim, heads, batch) with head_dim contiguous.

using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;

template <class Element>
using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShape{},
                                        GmemStride{}));

inline GmemShape gmem_shape(int32_t seq, int32_t head_dim, int32_t heads, int32_t batch) {
  return make_shape(seq, head_dim, heads, batch);
}

inline GmemStride gmem_stride(const BshdStrides& s) { return make_stride(s.row, _1{}, s.head, s.batch); }

template <class Element, class SmemLayout>
auto make_tma_load(const void* base, GmemShape shape, GmemStride stride, SmemLayout const& tile) {
  Tensor gmem = make_tensor(make_gmem_ptr(static_cast<Element const*>(base)), shape, stride);
  return make_tma_copy(SM90_TMA_LOAD{}, gmem, tile);
}

template <class Element, class SmemLayout>
using TmaLoad = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor<Element>{}, SmemLayout{}));

// ---------------------------------------------------------------------------------------------------------
// wgmma issue: C (+)= A * B for one warpgroup-level TiledMma, committed as one batch (not waited for).
// A is either smem descriptors or registers (kRegisterA); K-blocks are unrolled.

template <bool kZeroInit, bool kRegisterA, class TiledMma, class TensorA, class TensorB, class TensorC>
CUTE_DEVICE void wgmma_issue(TiledMma& mma, TensorA& a, TensorB const& b, TensorC& c) {
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// ---------------------------------------------------------------------------------------------------------
// Accumulator views. A wgmma accumulator fragment has layout ((2, 2, N/8), MMA_M, MMA_N): per 8-column
// chunk, two adjacent columns of two rows (r, r + 8).

// (row, col) view: ((2, MMA_M), (2, N/8, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_rowcol(Layout const& layout) {
  static_assert(decltype(rank<0>(layout))::value == 3);
  auto values = get<0>(layout);
  return make_layout(make_layout(get<1>(values), get<1>(layout)),
                     make_layout(get<0>(values), get<2>(values), get<2>(layout)));
}

// The same registers as the A operand of a register-sourced wgmma with K = N: ((2, 2, 2), 1, N/16).
// Values (v0, v1, v2) of K-block k are accumulator values (v0, v1, 2k + v2), so no data moves.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_as_operand_a(Layout const& layout) {
  static_assert(decltype(size<1>(layout))::value == 1 && decltype(size<2>(layout))::value == 1);
  auto values = get<0>(layout);
  constexpr int kChunks = decltype(size<2>(values))::value;
  static_assert(kChunks % 2 == 0, "the accumulator must hold whole 16-column K-blocks");
  auto chunk_stride = stride<0, 2>(layout);
  return make_layout(make_layout(get<0>(values), get<1>(values), make_layout(_2{}, chunk_stride)), get<1>(layout),
                     make_layout(Int<kChunks / 2>{}, chunk_stride * _2{}));
}

// Element-wise conversion of a register fragment (cvt with packed pairs), keeping its layout.
template <class To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int kSize = decltype(cosize(Layout{}))::value;
  static_assert(decltype(size(Layout{}))::value == kSize, "fragment must be compact");
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, kSize> convert;
  *reinterpret_cast<cutlass::Array<To, kSize>*>(raw_pointer_cast(dst.data())) =
      convert(*reinterpret_cast<cutlass::Array<From, kSize> const*>(raw_pointer_cast(src.data())));
  return dst;
}

// ---------------------------------------------------------------------------------------------------------
// Reductions over the four lanes that share an accumulator row (lanes differing in lane % 4).

CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

CUTE_DEVICE float quad_min(float x) {
  x = fminf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fminf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------
// mbarriers for tile-stationary operands (Q in forward, K/V in dK/dV): one "full" barrier completed by TMA
// bytes, one "empty" barrier that every consumer thread arrives on. The compiler fences keep ordinary
// shared-memory accesses (the tile info) on the right side of the waits and arrives.

CUTE_DEVICE void barrier_wait(uint64_t* barrier, uint32_t phase) {
  cutlass::arch::ClusterBarrier::wait(barrier, phase);
  asm volatile("" ::: "memory");
}

CUTE_DEVICE void barrier_arrive(uint64_t* barrier) {
  asm volatile("" ::: "memory");
  cutlass::arch::ClusterBarrier::arrive(barrier);
}

CUTE_DEVICE void barrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("" ::: "memory");
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(barrier, bytes);
}

// Named barriers of one consumer warpgroup (ids above CUTLASS's reserved ones).
enum class NamedBarrierId : uint32_t { kEpilogueWarpGroup0 = 1, kEpilogueWarpGroup1 = 2 };

CUTE_DEVICE void warpgroup_barrier(int consumer_warp_group) {
  cutlass::arch::NamedBarrier::sync(kWarpGroupThreads,
                                    static_cast<uint32_t>(NamedBarrierId::kEpilogueWarpGroup0) + consumer_warp_group);
}

// ---------------------------------------------------------------------------------------------------------
// Static persistent scheduler: tile t -> (block, head, batch); CTA c takes tiles c, c + grid, ... The block
// index varies slowest so that, with `heavy_first`, the tiles with the most work start first.

struct TileCoord {
  int32_t block;
  int32_t head;
  int32_t batch;
};

struct TileScheduler {
  int32_t num_blocks;
  int32_t heads;
  int32_t batch;
  bool reverse_blocks;  // visit block num_blocks - 1 first

  CUTE_HOST_DEVICE int32_t num_tiles() const { return num_blocks * heads * batch; }

  CUTE_HOST_DEVICE TileCoord decode(int32_t tile) const {
    const int32_t per_block = heads * batch;
    int32_t block = tile / per_block;
    const int32_t rest = tile - block * per_block;
    if (reverse_blocks) block = num_blocks - 1 - block;
    return {block, rest % heads, rest / heads};
  }
};

inline int32_t persistent_grid(int32_t num_tiles, int32_t num_sms) {
  return num_tiles < num_sms ? num_tiles : num_sms;
}

// Key/query tile range of a plan in block units: blocks [begin, end) cover elements [lo, hi).
struct BlockRange {
  int32_t begin;
  int32_t end;
};

CUTE_HOST_DEVICE BlockRange blocks_covering(int32_t lo, int32_t hi, int32_t block) {
  if (lo >= hi) return {0, 0};
  return {lo / block, (hi + block - 1) / block};
}

// ---------------------------------------------------------------------------------------------------------
// Epilogue: one consumer warpgroup stores its 64 x kHeadDim slab of a float accumulator (already scaled) as
// Element. The values go through padded shared-memory rows (conflict-free 4-byte writes), then each thread
// writes whole 16-byte chunks of rows below `valid_rows`, so global stores are coalesced and never touch
// rows past the sequence end.

template <int kHeadDim>
struct StagingTile {
  static constexpr int kPitch = kHeadDim + 8;  // elements per staged row
};

template <int kHeadDim, class Element, class AccRowCol, class CoordRowCol>
CUTE_DEVICE void store_warpgroup_rows(AccRowCol const& acc, CoordRowCol const& coord, Element* stage,
                                      int consumer_warp_group, int thread_in_group, Element* gmem_tile,
                                      int64_t gmem_row_stride, int32_t valid_rows) {
  constexpr int kPitch = StagingTile<kHeadDim>::kPitch;
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRows = 64;

  warpgroup_barrier(consumer_warp_group);  // the previous tile's reads of this slab are done
  CUTE_UNROLL
  for (int r = 0; r < size<0>(acc); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc); c += 2) {
      const auto rc = coord(r, c);
      cutlass::Array<Element, 2> pair;
      pair[0] = static_cast<Element>(acc(r, c));
      pair[1] = static_cast<Element>(acc(r, c + 1));
      *reinterpret_cast<cutlass::Array<Element, 2>*>(stage + get<0>(rc) * kPitch + get<1>(rc)) = pair;
    }
  }
  warpgroup_barrier(consumer_warp_group);
  // Thread t copies chunk t % kChunksPerRow of rows t / kChunksPerRow + i * kRowsPerPass. The pointers advance
  // by induction so that the compiler keeps two addresses live rather than one per pass.
  constexpr int kRowsPerPass = kWarpGroupThreads / kChunksPerRow;
  constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  const int row_in_pass = thread_in_group / kChunksPerRow;
  const int col = (thread_in_group % kChunksPerRow) * 8;
  int row = consumer_warp_group * kRows + row_in_pass;
  const int row_end = min(consumer_warp_group * kRows + kRows, valid_rows);
  const Element* src = stage + row * kPitch + col;
  Element* dst = gmem_tile + row * gmem_row_stride + col;
  if (row_in_pass < kRowsPerPass) {
    CUTE_UNROLL
    for (int i = 0; i < kPasses; ++i) {
      if (row < row_end) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      row += kRowsPerPass;
      src += kRowsPerPass * kPitch;
      dst += kRowsPerPass * gmem_row_stride;
    }
  }
}

}  // namespace flamingo_fast::attention
