// Backward, dK/dV pass: per key tile (128 keys, 64 per consumer warpgroup), over the query rows that see it
// (mask policy: key_tile_queries) and over every query head of its KV group:
//   S^T = K Q^T, dP^T = V dO^T (wgmma, shared-memory operands), P^T = exp2(S^T * scale_log2 - lse_log2),
//   dV += P^T dO, dS^T = P^T * (dP^T - D), dK += dS^T Q (wgmma with P^T / dS^T from registers).
// Computing the transposed scores puts keys on the accumulator rows, so P^T and dS^T feed the dV and dK
// GEMMs straight from registers and no tile is transposed through shared memory. dK/dV stay in fp32
// registers for the whole tile (one CTA owns a key tile): deterministic, no atomics.
// The producer also bulk-copies the 64-row slices of lse_log2 and D next to each Q/dO stage.
#pragma once

#include "kernel_common.cuh"
#include "online_softmax.cuh"

namespace flamingo_fast::attention {

template <class Element_, int kHeadDim_, int kBlockN_, int kBlockM_, int kStages_>
struct DkdvConfig {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerWarpGroups = kBlockN / 64;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * kWarpGroupThreads;
  static constexpr int kThreads = kConsumerThreads + kWarpGroupThreads;
  static constexpr int kProducerRegisters = kConsumerWarpGroups == 2 ? 24 : 40;
  static constexpr int kConsumerRegisters = kConsumerWarpGroups == 2 ? 240 : 232;

  using AtomLayout = Layout<Shape<Int<kConsumerWarpGroups>, _1, _1>>;
  // S^T = K Q^T and dP^T = V dO^T: rows are keys.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), AtomLayout{}));
  // dV += P^T dO and dK += dS^T Q: contraction over the query rows.
  using TiledMmaDkv = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutK = SmemTileLayout<Element, kBlockN, kHeadDim, 1>;
  using SmemLayoutQ = SmemTileLayout<Element, kBlockM, kHeadDim, kStages>;
  using SmemLayoutQt = decltype(transposed_smem_layout(SmemLayoutQ{}));
  using TmaK = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutK{}))>;
  using TmaQ = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutQ{}))>;
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  static constexpr uint32_t kKBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kStatsBytes = kBlockM * sizeof(float);
  static constexpr uint32_t kStageBytes = 2 * kQBytes + 2 * kStatsBytes;  // Q, dO, lse_log2, D

  struct TileInfo {
    int32_t block_begin;  // query blocks [block_begin, block_end) of every query head of the group
    int32_t block_end;
  };

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<float, kBlockM * kStages, 128> lse_log2;
    cute::array_aligned<float, kBlockM * kStages, 128> dpsum;
    cute::array_aligned<Element, kBlockN * StagingTile<kHeadDim>::kPitch, 128> staging;
    typename Pipeline::SharedStorage pipeline_q;
    uint64_t kv_full;
    uint64_t kv_empty;
    TileInfo tile;
  };
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "shared memory budget exceeded");
};

template <class Config>
struct DkdvParams {
  using Element = typename Config::Element;
  typename Config::TmaK tma_k;
  typename Config::TmaK tma_v;
  typename Config::TmaQ tma_q;
  typename Config::TmaQ tma_dout;
  GmemShape shape_q;
  GmemShape shape_k;
  Element* dk;
  Element* dv;
  BshdStrides dk_strides;
  BshdStrides dv_strides;
  const float* lse_log2;
  const float* dpsum;
  int32_t seqlen_q_padded;
  MaskContext mask;
  TileScheduler scheduler;  // (key block, kv head, batch)
  int32_t heads_q;
  int32_t kv_group;
  float scale;
  float scale_log2;
  float masked_score;
};

template <class Config, class Mask>
struct DkdvKernel {
  using Element = typename Config::Element;
  using Params = DkdvParams<Config>;
  using SharedStorage = typename Config::SharedStorage;
  using Pipeline = typename Config::Pipeline;
  using PipelineState = typename Config::PipelineState;
  static constexpr int kBlockM = Config::kBlockM;
  static constexpr int kBlockN = Config::kBlockN;
  static constexpr int kHeadDim = Config::kHeadDim;

  CUTE_DEVICE static typename Config::TileInfo plan(Params const& params, TileCoord tile) {
    const IndexRange queries =
        Mask::key_tile_queries(params.mask, tile.batch, tile.block * kBlockN, (tile.block + 1) * kBlockN);
    const BlockRange blocks = blocks_covering(queries.begin, queries.end, kBlockM);
    return {blocks.begin, blocks.end};
  }

  CUTE_DEVICE static void produce(Params const& params, SharedStorage& shared, Pipeline& pipeline_q) {
    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutK{});
    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Config::SmemLayoutQ{});
    Tensor mK = params.tma_k.get_tma_tensor(params.shape_k);
    Tensor mV = params.tma_v.get_tma_tensor(params.shape_k);
    Tensor mQ = params.tma_q.get_tma_tensor(params.shape_q);
    Tensor mdO = params.tma_dout.get_tma_tensor(params.shape_q);
    auto tma_k = params.tma_k.get_slice(_0{});
    auto tma_v = params.tma_v.get_slice(_0{});
    auto tma_q = params.tma_q.get_slice(_0{});
    auto tma_dout = params.tma_dout.get_slice(_0{});
    Tensor tKsK = tma_k.partition_D(sK(_, _, 0));
    Tensor tVsV = tma_v.partition_D(sV(_, _, 0));
    Tensor tQsQ = tma_q.partition_D(sQ);
    Tensor tdOsdO = tma_dout.partition_D(sdO);

    PipelineState q_state = cutlass::make_producer_start_state<Pipeline>();
    uint32_t kv_empty_phase = 1;
    auto kv_shape = Shape<Int<kBlockN>, Int<kHeadDim>>{};
    auto q_shape = Shape<Int<kBlockM>, Int<kHeadDim>>{};

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const typename Config::TileInfo info = plan(params, tile);
      barrier_wait(&shared.kv_empty, kv_empty_phase);
      kv_empty_phase ^= 1;
      shared.tile = info;
      if (info.block_begin >= info.block_end) {
        barrier_arrive(&shared.kv_full);
        continue;
      }
      barrier_arrive_expect_tx(&shared.kv_full, 2 * Config::kKBytes);
      copy(params.tma_k.with(shared.kv_full, 0, TMA::CacheHintSm90::EVICT_FIRST),
           tma_k.partition_S(local_tile(mK(_, _, tile.head, tile.batch), kv_shape, make_coord(tile.block, _0{}))),
           tKsK);
      copy(params.tma_v.with(shared.kv_full, 0, TMA::CacheHintSm90::EVICT_FIRST),
           tma_v.partition_S(local_tile(mV(_, _, tile.head, tile.batch), kv_shape, make_coord(tile.block, _0{}))),
           tVsV);

      for (int32_t g = 0; g < params.kv_group; ++g) {
        const int32_t head_q = tile.head * params.kv_group + g;
        Tensor tQgQ = tma_q.partition_S(local_tile(mQ(_, _, head_q, tile.batch), q_shape, make_coord(_, _0{})));
        Tensor tdOgdO =
            tma_dout.partition_S(local_tile(mdO(_, _, head_q, tile.batch), q_shape, make_coord(_, _0{})));
        const int64_t stats_row =
            (static_cast<int64_t>(tile.batch) * params.heads_q + head_q) * params.seqlen_q_padded;
        for (int32_t m = info.block_begin; m < info.block_end; ++m) {
          pipeline_q.producer_acquire(q_state);
          uint64_t* barrier = pipeline_q.producer_get_barrier(q_state);
          const int stage = q_state.index();
          copy(params.tma_q.with(*barrier, 0, TMA::CacheHintSm90::EVICT_LAST), tQgQ(_, _, _, m), tQsQ(_, _, _, stage));
          copy(params.tma_dout.with(*barrier, 0, TMA::CacheHintSm90::EVICT_LAST), tdOgdO(_, _, _, m), tdOsdO(_, _, _, stage));
          // Padded workspaces: the slice is in bounds and 16-byte aligned.
          SM90_BULK_COPY_G2S::copy(params.lse_log2 + stats_row + m * kBlockM, barrier,
                                   shared.lse_log2.data() + stage * kBlockM, Config::kStatsBytes);
          SM90_BULK_COPY_G2S::copy(params.dpsum + stats_row + m * kBlockM, barrier,
                                   shared.dpsum.data() + stage * kBlockM, Config::kStatsBytes);
          ++q_state;
        }
      }
    }
  }

  CUTE_DEVICE static void consume(Params const& params, SharedStorage& shared, Pipeline& pipeline_q) {
    const int consumer_thread = threadIdx.x - kWarpGroupThreads;
    const int consumer_warp_group = consumer_thread / kWarpGroupThreads;
    const int thread_in_group = consumer_thread % kWarpGroupThreads;

    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutK{});
    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Config::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(shared.dout.data()), typename Config::SmemLayoutQt{});

    typename Config::TiledMmaSdP mma_sdp;
    typename Config::TiledMmaDkv mma_dkv;
    auto thr_sdp = mma_sdp.get_thread_slice(consumer_thread);
    auto thr_dkv = mma_dkv.get_thread_slice(consumer_thread);
    Tensor tSrK = thr_sdp.partition_fragment_A(sK(_, _, 0));
    Tensor tSrV = thr_sdp.partition_fragment_A(sV(_, _, 0));
    Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, MMA_N, MMA_K, stage)
    Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
    Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);   // (MMA, MMA_N, MMA_K, stage)
    Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);

    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
    Tensor probs = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));      // (keys, queries)
    Tensor dprobs = make_tensor(tSrdP.data(), accumulator_rowcol(tSrdP.layout()));
    Tensor acc_dk = make_tensor(tdKrdK.data(), accumulator_rowcol(tdKrdK.layout()));
    Tensor acc_dv = make_tensor(tdVrdV.data(), accumulator_rowcol(tdVrdV.layout()));
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
    Tensor score_coord = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tdKcdK = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor dkv_coord = make_tensor(tdKcdK.data(), accumulator_rowcol(tdKcdK.layout()));
    constexpr int kRows = decltype(size<0>(probs))::value;
    constexpr int kCols = decltype(size<1>(probs))::value;

    PipelineState q_state;
    uint32_t kv_full_phase = 0;

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const int32_t k0 = tile.block * kBlockN;
      barrier_wait(&shared.kv_full, kv_full_phase);
      kv_full_phase ^= 1;
      const typename Config::TileInfo info = shared.tile;
      clear(tdKrdK);
      clear(tdVrdV);

      for (int32_t g = 0; g < params.kv_group && info.block_begin < info.block_end; ++g) {
        for (int32_t m = info.block_begin; m < info.block_end; ++m) {
          const int32_t q0 = m * kBlockM;
          const bool needs_mask = Mask::key_tile_needs_mask(params.mask, tile.batch, q0, q0 + kBlockM, k0,
                                                            k0 + kBlockN);
          pipeline_q.consumer_wait(q_state);
          const int stage = q_state.index();
          wgmma_issue<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
          wgmma_issue<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, stage), tSrdP);
          const float* lse_log2 = shared.lse_log2.data() + stage * kBlockM;
          const float* dpsum = shared.dpsum.data() + stage * kBlockM;
          warpgroup_wait<1>();  // S^T ready
          if (needs_mask) {
            CUTE_UNROLL
            for (int c = 0; c < kCols; ++c) {
              const IndexRange keys = Mask::row_keys(params.mask, tile.batch, q0 + get<1>(score_coord(0, c)));
              CUTE_UNROLL
              for (int r = 0; r < kRows; ++r) {
                const int32_t key = k0 + get<0>(score_coord(r, c));
                if (key < keys.begin || key >= keys.end) probs(r, c) = params.masked_score;
              }
            }
          }
          CUTE_UNROLL
          for (int c = 0; c < kCols; ++c) {
            const float lse = lse_log2[get<1>(score_coord(0, c))];
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) probs(r, c) = exp2f(fmaf(probs(r, c), params.scale_log2, -lse));
          }
          Tensor probs_lowp = convert_fragment<Element>(tSrS);
          Tensor tdVrP = make_tensor(probs_lowp.data(), accumulator_as_operand_a(probs_lowp.layout()));
          wgmma_issue<false, true>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), tdVrdV);
          warpgroup_wait<1>();  // dP^T ready; dV still running
          CUTE_UNROLL
          for (int c = 0; c < kCols; ++c) {
            const float d = dpsum[get<1>(score_coord(0, c))];
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) dprobs(r, c) = probs(r, c) * (dprobs(r, c) - d);
          }
          Tensor dscores_lowp = convert_fragment<Element>(tSrdP);
          Tensor tdKrdS = make_tensor(dscores_lowp.data(), accumulator_as_operand_a(dscores_lowp.layout()));
          wgmma_issue<false, true>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), tdKrdK);
          warpgroup_wait<0>();
          pipeline_q.consumer_release(q_state);
          ++q_state;
        }
      }
      barrier_arrive(&shared.kv_empty);  // K and V are no longer read

      float scale[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) scale[r] = params.scale;
      scale_rows(acc_dk, scale);
      const int32_t valid_rows = params.mask.seqlen_k - k0;
      const int64_t dv_offset = static_cast<int64_t>(tile.batch) * params.dv_strides.batch +
                                static_cast<int64_t>(k0) * params.dv_strides.row +
                                static_cast<int64_t>(tile.head) * params.dv_strides.head;
      store_warpgroup_rows<kHeadDim>(acc_dv, dkv_coord, shared.staging.data(), consumer_warp_group,
                                     thread_in_group, params.dv + dv_offset, params.dv_strides.row, valid_rows);
      const int64_t dk_offset = static_cast<int64_t>(tile.batch) * params.dk_strides.batch +
                                static_cast<int64_t>(k0) * params.dk_strides.row +
                                static_cast<int64_t>(tile.head) * params.dk_strides.head;
      store_warpgroup_rows<kHeadDim>(acc_dk, dkv_coord, shared.staging.data(), consumer_warp_group,
                                     thread_in_group, params.dk + dk_offset, params.dk_strides.row, valid_rows);
    }
  }
};

template <class Config, class Mask>
__global__ void __launch_bounds__(Config::kThreads, 1)
    attention_bwd_dkdv_kernel(CUTE_GRID_CONSTANT DkdvParams<Config> const params) {
  using Kernel = DkdvKernel<Config, Mask>;
  using Pipeline = typename Config::Pipeline;
  extern __shared__ __align__(1024) char shared_raw[];  // 128-byte swizzled tiles need 1024-byte alignment
  auto& shared = *reinterpret_cast<typename Config::SharedStorage*>(shared_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_dout.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&shared.kv_full, 1);
    cutlass::arch::ClusterBarrier::init(&shared.kv_empty, Config::kConsumerThreads);
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Config::kStageBytes;
  pipeline_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Config::kConsumerThreads;
  Pipeline pipeline_q(shared.pipeline_q, pipeline_params, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Config::kProducerRegisters>();
    if (threadIdx.x == 0) Kernel::produce(params, shared, pipeline_q);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Config::kConsumerRegisters>();
    Kernel::consume(params, shared, pipeline_q);
  }
}

// At head_dim 128 the dK and dV accumulators take 128 registers per thread, so the query step shrinks to
// 32 rows (halving the S^T, dP^T, P^T and dS^T fragments) and the pipeline gets a third stage instead.
template <class Element, int kHeadDim, class Mask>
struct DkdvConfigFor {
  static constexpr AttentionTiles kTiles = attention_tiles(Mask::kKind);
  static constexpr int kBlockM = kHeadDim > 96 ? 32 : kTiles.dkdv_block_m;
  using type = DkdvConfig<Element, kHeadDim, kTiles.dkdv_block_n, kBlockM, kBlockM == 32 ? 3 : 2>;
};

template <class Element, int kHeadDim, class Mask>
cudaError_t launch_attention_bwd_dkdv(const AttentionBwdArgs& args, cudaStream_t stream) {
  using Config = typename DkdvConfigFor<Element, kHeadDim, Mask>::type;
  static_assert(kAttentionRowPadding % Config::kBlockM == 0, "query steps must tile the padded workspaces");
  const AttentionProblem& p = args.problem;
  const GmemShape shape_q = gmem_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch);
  const GmemShape shape_k = gmem_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch);
  auto q_tile = take<0, 2>(typename Config::SmemLayoutQ{});
  auto k_tile = take<0, 2>(typename Config::SmemLayoutK{});
  DkdvParams<Config> params{
      make_tma_load<Element>(args.k, shape_k, gmem_stride(args.k_strides), k_tile),
      make_tma_load<Element>(args.v, shape_k, gmem_stride(args.v_strides), k_tile),
      make_tma_load<Element>(args.q, shape_q, gmem_stride(args.q_strides), q_tile),
      make_tma_load<Element>(args.dout, shape_q, gmem_stride(args.dout_strides), q_tile),
      shape_q,
      shape_k,
      static_cast<Element*>(args.dk),
      static_cast<Element*>(args.dv),
      args.dk_strides,
      args.dv_strides,
      args.lse_log2,
      args.dpsum,
      args.seqlen_q_padded,
      MaskContext{p.seqlen_q, p.seqlen_k, args.media},
      TileScheduler{(p.seqlen_k + Config::kBlockN - 1) / Config::kBlockN, p.heads_kv, p.batch, false},
      p.heads_q,
      p.heads_q / p.heads_kv,
      args.softmax_scale,
      args.softmax_scale * kLog2e,
      args.softmax_scale < 0.f ? INFINITY : -INFINITY,
  };
  const int32_t num_tiles = params.scheduler.num_tiles();
  if (num_tiles == 0) return cudaSuccess;
  auto kernel = attention_bwd_dkdv_kernel<Config, Mask>;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSharedBytes);
  if (status != cudaSuccess) return status;
  kernel<<<persistent_grid(num_tiles, args.num_sms), Config::kThreads, Config::kSharedBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flamingo_fast::attention
