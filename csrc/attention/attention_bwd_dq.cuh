// Backward, dQ pass: per query tile, over the same key blocks as the forward (mask policy plan):
//   S = Q K^T, dP = dO V^T (wgmma, shared-memory operands), P = exp2(S * scale_log2 - lse_log2),
//   dS = P * (dP - D), dQ += dS K (wgmma with dS from registers), then dQ * scale -> dq.
// dQ stays in fp32 registers for the whole tile and every query tile is owned by one CTA, so the result is
// deterministic (no atomics). Same warp specialisation and persistent scheduling as the forward kernel.
#pragma once

#include "kernel_common.cuh"
#include "online_softmax.cuh"

namespace flamingo_fast::attention {

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct DqConfig {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerWarpGroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * kWarpGroupThreads;
  static constexpr int kThreads = kConsumerThreads + kWarpGroupThreads;
  static constexpr int kProducerRegisters = kConsumerWarpGroups == 2 ? 24 : 40;
  static constexpr int kConsumerRegisters = kConsumerWarpGroups == 2 ? 240 : 232;

  using AtomLayout = Layout<Shape<Int<kConsumerWarpGroups>, _1, _1>>;
  // S = Q K^T and dP = dO V^T.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), AtomLayout{}));
  // dQ += dS K.
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutQ = SmemTileLayout<Element, kBlockM, kHeadDim, 1>;
  using SmemLayoutK = SmemTileLayout<Element, kBlockN, kHeadDim, kStages>;
  using SmemLayoutKt = decltype(transposed_smem_layout(SmemLayoutK{}));
  using TmaQ = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutQ{}))>;
  using TmaKV = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutK{}))>;
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  struct TileInfo {
    int32_t block_begin;
    int32_t block_end;
    int32_t full_begin;
    int32_t full_end;
  };

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, kBlockM * StagingTile<kHeadDim>::kPitch, 128> staging;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    uint64_t q_full;  // Q and dO of the tile
    uint64_t q_empty;
    TileInfo tile;
  };
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "shared memory budget exceeded");
};

template <class Config>
struct DqParams {
  using Element = typename Config::Element;
  typename Config::TmaQ tma_q;
  typename Config::TmaQ tma_dout;
  typename Config::TmaKV tma_k;
  typename Config::TmaKV tma_v;
  GmemShape shape_q;
  GmemShape shape_k;
  Element* dq;
  BshdStrides dq_strides;
  const float* lse_log2;
  const float* dpsum;
  int32_t seqlen_q_padded;
  MaskContext mask;
  TileScheduler scheduler;
  int32_t heads_q;
  int32_t kv_group;
  float scale;
  float scale_log2;
  float masked_score;
};

template <class Config, class Mask>
struct DqKernel {
  using Element = typename Config::Element;
  using Params = DqParams<Config>;
  using SharedStorage = typename Config::SharedStorage;
  using Pipeline = typename Config::Pipeline;
  using PipelineState = typename Config::PipelineState;
  static constexpr int kBlockM = Config::kBlockM;
  static constexpr int kBlockN = Config::kBlockN;
  static constexpr int kHeadDim = Config::kHeadDim;

  CUTE_DEVICE static typename Config::TileInfo plan(Params const& params, TileCoord tile) {
    const QueryTilePlan p =
        Mask::plan_query_tile(params.mask, tile.batch, tile.block * kBlockM, (tile.block + 1) * kBlockM);
    const BlockRange blocks = blocks_covering(p.key_begin, p.key_end, kBlockN);
    return {blocks.begin, blocks.end, p.full_begin, p.full_end};
  }

  CUTE_DEVICE static void produce(Params const& params, SharedStorage& shared, Pipeline& pipeline_k,
                                  Pipeline& pipeline_v) {
    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Config::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutK{});
    Tensor mQ = params.tma_q.get_tma_tensor(params.shape_q);
    Tensor mdO = params.tma_dout.get_tma_tensor(params.shape_q);
    Tensor mK = params.tma_k.get_tma_tensor(params.shape_k);
    Tensor mV = params.tma_v.get_tma_tensor(params.shape_k);
    auto tma_q = params.tma_q.get_slice(_0{});
    auto tma_dout = params.tma_dout.get_slice(_0{});
    auto tma_k = params.tma_k.get_slice(_0{});
    auto tma_v = params.tma_v.get_slice(_0{});
    Tensor tQsQ = tma_q.partition_D(sQ(_, _, 0));
    Tensor tdOsdO = tma_dout.partition_D(sdO(_, _, 0));
    Tensor tKsK = tma_k.partition_D(sK);
    Tensor tVsV = tma_v.partition_D(sV);

    PipelineState k_state = cutlass::make_producer_start_state<Pipeline>();
    PipelineState v_state = cutlass::make_producer_start_state<Pipeline>();
    uint32_t q_empty_phase = 1;

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const typename Config::TileInfo info = plan(params, tile);
      barrier_wait(&shared.q_empty, q_empty_phase);
      q_empty_phase ^= 1;
      shared.tile = info;
      if (info.block_begin >= info.block_end) {
        barrier_arrive(&shared.q_full);
        continue;
      }
      barrier_arrive_expect_tx(&shared.q_full, 2 * Config::kQBytes);
      auto tile_shape = Shape<Int<kBlockM>, Int<kHeadDim>>{};
      copy(params.tma_q.with(shared.q_full, 0, TMA::CacheHintSm90::EVICT_FIRST),
           tma_q.partition_S(local_tile(mQ(_, _, tile.head, tile.batch), tile_shape, make_coord(tile.block, _0{}))),
           tQsQ);
      copy(params.tma_dout.with(shared.q_full, 0, TMA::CacheHintSm90::EVICT_FIRST),
           tma_dout.partition_S(local_tile(mdO(_, _, tile.head, tile.batch), tile_shape, make_coord(tile.block, _0{}))),
           tdOsdO);

      const int32_t kv_head = tile.head / params.kv_group;
      auto kv_shape = Shape<Int<kBlockN>, Int<kHeadDim>>{};
      Tensor tKgK = tma_k.partition_S(local_tile(mK(_, _, kv_head, tile.batch), kv_shape, make_coord(_, _0{})));
      Tensor tVgV = tma_v.partition_S(local_tile(mV(_, _, kv_head, tile.batch), kv_shape, make_coord(_, _0{})));
      for (int32_t n = info.block_end - 1; n >= info.block_begin; --n) {
        pipeline_k.producer_acquire(k_state);
        copy(params.tma_k.with(*pipeline_k.producer_get_barrier(k_state), 0, TMA::CacheHintSm90::EVICT_LAST), tKgK(_, _, _, n),
             tKsK(_, _, _, k_state.index()));
        ++k_state;
        pipeline_v.producer_acquire(v_state);
        copy(params.tma_v.with(*pipeline_v.producer_get_barrier(v_state), 0, TMA::CacheHintSm90::EVICT_LAST), tVgV(_, _, _, n),
             tVsV(_, _, _, v_state.index()));
        ++v_state;
      }
    }
  }

  CUTE_DEVICE static void consume(Params const& params, SharedStorage& shared, Pipeline& pipeline_k,
                                  Pipeline& pipeline_v) {
    const int consumer_thread = threadIdx.x - kWarpGroupThreads;
    const int consumer_warp_group = consumer_thread / kWarpGroupThreads;
    const int thread_in_group = consumer_thread % kWarpGroupThreads;

    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Config::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutKt{});

    typename Config::TiledMmaSdP mma_sdp;
    typename Config::TiledMmaDq mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(consumer_thread);
    auto thr_dq = mma_dq.get_thread_slice(consumer_thread);
    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ(_, _, 0));
    Tensor tSrdO = thr_sdp.partition_fragment_A(sdO(_, _, 0));
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);
    Tensor tSrV = thr_sdp.partition_fragment_B(sV);
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);

    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor probs = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor dprobs = make_tensor(tSrdP.data(), accumulator_rowcol(tSrdP.layout()));
    Tensor acc_dq = make_tensor(tdQrdQ.data(), accumulator_rowcol(tdQrdQ.layout()));
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor score_coord = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor dq_coord = make_tensor(tdQcdQ.data(), accumulator_rowcol(tdQcdQ.layout()));
    constexpr int kRows = decltype(size<0>(probs))::value;

    PipelineState k_state;
    PipelineState v_state;
    uint32_t q_full_phase = 0;

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const int32_t q0 = tile.block * kBlockM;
      // Row statistics (padded workspaces: no bounds checks) and key intervals of this thread's rows.
      const int64_t stats_row = (static_cast<int64_t>(tile.batch) * params.heads_q + tile.head) * params.seqlen_q_padded;
      float lse_log2[kRows], dpsum[kRows];
      int32_t lo[kRows], hi[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int32_t q = q0 + get<0>(score_coord(r, 0));
        lse_log2[r] = params.lse_log2[stats_row + q];
        dpsum[r] = params.dpsum[stats_row + q];
        const IndexRange keys = Mask::row_keys(params.mask, tile.batch, q);
        lo[r] = keys.begin;
        hi[r] = keys.end;
      }
      barrier_wait(&shared.q_full, q_full_phase);
      q_full_phase ^= 1;
      const typename Config::TileInfo info = shared.tile;
      clear(tdQrdQ);

      if (info.block_begin >= info.block_end) barrier_arrive(&shared.q_empty);
      for (int32_t n = info.block_end - 1; n >= info.block_begin; --n) {
        pipeline_k.consumer_wait(k_state);
        wgmma_issue<true, false>(mma_sdp, tSrQ, tSrK(_, _, _, k_state.index()), tSrS);
        pipeline_v.consumer_wait(v_state);
        wgmma_issue<true, false>(mma_sdp, tSrdO, tSrV(_, _, _, v_state.index()), tSrdP);
        warpgroup_wait<1>();  // S ready
        if (!(info.full_begin <= n * kBlockN && (n + 1) * kBlockN <= info.full_end)) {
          mask_scores(probs, score_coord, n * kBlockN, lo, hi, params.masked_score);
        }
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTE_UNROLL
          for (int c = 0; c < size<1>(probs); ++c) {
            probs(r, c) = exp2f(fmaf(probs(r, c), params.scale_log2, -lse_log2[r]));
          }
        }
        warpgroup_wait<0>();  // dP ready: V, Q and dO are no longer read
        pipeline_v.consumer_release(v_state);
        ++v_state;
        if (n == info.block_begin) barrier_arrive(&shared.q_empty);
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTE_UNROLL
          for (int c = 0; c < size<1>(probs); ++c) dprobs(r, c) = probs(r, c) * (dprobs(r, c) - dpsum[r]);
        }
        Tensor dscores = convert_fragment<Element>(tSrdP);
        Tensor tdQrdS = make_tensor(dscores.data(), accumulator_as_operand_a(dscores.layout()));
        wgmma_issue<false, true>(mma_dq, tdQrdS, tdQrKt(_, _, _, k_state.index()), tdQrdQ);
        warpgroup_wait<0>();
        pipeline_k.consumer_release(k_state);
        ++k_state;
      }

      float scale[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) scale[r] = params.scale;
      scale_rows(acc_dq, scale);
      const int64_t offset = static_cast<int64_t>(tile.batch) * params.dq_strides.batch +
                             static_cast<int64_t>(q0) * params.dq_strides.row +
                             static_cast<int64_t>(tile.head) * params.dq_strides.head;
      store_warpgroup_rows<kHeadDim>(acc_dq, dq_coord, shared.staging.data(), consumer_warp_group, thread_in_group,
                                     params.dq + offset, params.dq_strides.row, params.mask.seqlen_q - q0);
    }
  }
};

template <class Config, class Mask>
__global__ void __launch_bounds__(Config::kThreads, 1)
    attention_bwd_dq_kernel(CUTE_GRID_CONSTANT DqParams<Config> const params) {
  using Kernel = DqKernel<Config, Mask>;
  using Pipeline = typename Config::Pipeline;
  extern __shared__ __align__(1024) char shared_raw[];  // 128-byte swizzled tiles need 1024-byte alignment
  auto& shared = *reinterpret_cast<typename Config::SharedStorage*>(shared_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_dout.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full, 1);
    cutlass::arch::ClusterBarrier::init(&shared.q_empty, Config::kConsumerThreads);
  }
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Config::kKVBytes;
  pipeline_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Config::kConsumerThreads;
  Pipeline pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Config::kProducerRegisters>();
    if (threadIdx.x == 0) Kernel::produce(params, shared, pipeline_k, pipeline_v);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Config::kConsumerRegisters>();
    Kernel::consume(params, shared, pipeline_k, pipeline_v);
  }
}

template <class Element, int kHeadDim, class Mask>
struct DqConfigFor {
  static constexpr AttentionTiles kTiles = attention_tiles(Mask::kKind);
  using type = DqConfig<Element, kHeadDim, kTiles.dq_block_m, kTiles.dq_block_n, 2>;
};

template <class Element, int kHeadDim, class Mask>
cudaError_t launch_attention_bwd_dq(const AttentionBwdArgs& args, cudaStream_t stream) {
  using Config = typename DqConfigFor<Element, kHeadDim, Mask>::type;
  const AttentionProblem& p = args.problem;
  const GmemShape shape_q = gmem_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch);
  const GmemShape shape_k = gmem_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch);
  auto q_tile = take<0, 2>(typename Config::SmemLayoutQ{});
  auto kv_tile = take<0, 2>(typename Config::SmemLayoutK{});
  DqParams<Config> params{
      make_tma_load<Element>(args.q, shape_q, gmem_stride(args.q_strides), q_tile),
      make_tma_load<Element>(args.dout, shape_q, gmem_stride(args.dout_strides), q_tile),
      make_tma_load<Element>(args.k, shape_k, gmem_stride(args.k_strides), kv_tile),
      make_tma_load<Element>(args.v, shape_k, gmem_stride(args.v_strides), kv_tile),
      shape_q,
      shape_k,
      static_cast<Element*>(args.dq),
      args.dq_strides,
      args.lse_log2,
      args.dpsum,
      args.seqlen_q_padded,
      MaskContext{p.seqlen_q, p.seqlen_k, args.media},
      TileScheduler{(p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM, p.heads_q, p.batch,
                    Mask::kKind == AttentionMaskKind::kCausal},
      p.heads_q,
      p.heads_q / p.heads_kv,
      args.softmax_scale,
      args.softmax_scale * kLog2e,
      args.softmax_scale < 0.f ? INFINITY : -INFINITY,
  };
  const int32_t num_tiles = params.scheduler.num_tiles();
  if (num_tiles == 0) return cudaSuccess;
  auto kernel = attention_bwd_dq_kernel<Config, Mask>;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSharedBytes);
  if (status != cudaSuccess) return status;
  kernel<<<persistent_grid(num_tiles, args.num_sms), Config::kThreads, Config::kSharedBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flamingo_fast::attention
