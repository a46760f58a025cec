// Forward attention kernel for Hopper, specialised by mask policy.
//
// Structure (one CTA per SM, persistent over (query tile, head, batch) tiles):
//   warpgroup 0  producer: one thread plans each tile (mask policy) and issues TMA loads of Q (once per tile)
//                and K/V (per key block) into a kStages-deep shared-memory pipeline on mbarriers;
//                it gives its registers away (setmaxnreg.dec).
//   warpgroups 1.. consumers, 64 query rows each (setmaxnreg.inc): S = Q K^T (wgmma, both operands in
//                shared memory), online softmax in registers, O += P V (wgmma with P from registers).
// With kOverlap the consumers issue the next block's Q K^T and the current block's P V back to back and
// run the softmax while the tensor cores work (the "simple" variant, kOverlap = false, is kept as a
// fallback, selected at build time with -DFLAMINGO_FAST_ATTENTION_SIMPLE).
#pragma once

#include "kernel_common.cuh"
#include "online_softmax.cuh"

namespace flamingo_fast::attention {

#ifdef FLAMINGO_FAST_ATTENTION_SIMPLE
inline constexpr bool kFwdOverlap = false;
#else
inline constexpr bool kFwdOverlap = true;
#endif

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct FwdConfig {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerWarpGroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * kWarpGroupThreads;
  static constexpr int kThreads = kConsumerThreads + kWarpGroupThreads;
  // Register budget after setmaxnreg: 65536 registers per SM, one CTA per SM.
  static constexpr int kProducerRegisters = kConsumerWarpGroups == 2 ? 24 : 40;
  static constexpr int kConsumerRegisters = kConsumerWarpGroups == 2 ? 240 : 232;

  using AtomLayout = Layout<Shape<Int<kConsumerWarpGroups>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutQ = SmemTileLayout<Element, kBlockM, kHeadDim, 1>;
  using SmemLayoutK = SmemTileLayout<Element, kBlockN, kHeadDim, kStages>;
  using SmemLayoutVt = decltype(transposed_smem_layout(SmemLayoutK{}));
  using TmaQ = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutQ{}))>;
  using TmaKV = TmaLoad<Element, decltype(take<0, 2>(SmemLayoutK{}))>;
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  struct TileInfo {
    int32_t block_begin;  // key blocks [block_begin, block_end), visited last to first
    int32_t block_end;
    int32_t full_begin;   // keys every row of the tile sees: blocks inside need no element mask
    int32_t full_end;
  };

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, kBlockM * StagingTile<kHeadDim>::kPitch, 128> o;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    uint64_t q_full;
    uint64_t q_empty;
    TileInfo tile;
  };
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "shared memory budget exceeded");
};

template <class Config>
struct FwdParams {
  using Element = typename Config::Element;
  typename Config::TmaQ tma_q;
  typename Config::TmaKV tma_k;
  typename Config::TmaKV tma_v;
  GmemShape shape_q;
  GmemShape shape_k;
  Element* out;
  BshdStrides out_strides;
  float* lse;
  MaskContext mask;
  TileScheduler scheduler;
  int32_t heads_q;
  int32_t kv_group;  // query heads per KV head
  float scale_log2;
  float masked_score;
  bool negative_scale;
};

template <class Config, class Mask>
struct FwdKernel {
  using Element = typename Config::Element;
  using Params = FwdParams<Config>;
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

  // ------------------------------------------------------------------------------------------------------
  CUTE_DEVICE static void produce(Params const& params, SharedStorage& shared, Pipeline& pipeline_k,
                                  Pipeline& pipeline_v) {
    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutK{});
    Tensor mQ = params.tma_q.get_tma_tensor(params.shape_q);
    Tensor mK = params.tma_k.get_tma_tensor(params.shape_k);
    Tensor mV = params.tma_v.get_tma_tensor(params.shape_k);
    auto tma_q = params.tma_q.get_slice(_0{});
    auto tma_k = params.tma_k.get_slice(_0{});
    auto tma_v = params.tma_v.get_slice(_0{});
    Tensor tQsQ = tma_q.partition_D(sQ(_, _, 0));
    Tensor tKsK = tma_k.partition_D(sK);
    Tensor tVsV = tma_v.partition_D(sV);

    PipelineState k_state = cutlass::make_producer_start_state<Pipeline>();
    PipelineState v_state = cutlass::make_producer_start_state<Pipeline>();
    uint32_t q_empty_phase = 1;  // a fresh barrier counts as released

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const typename Config::TileInfo info = plan(params, tile);
      barrier_wait(&shared.q_empty, q_empty_phase);
      q_empty_phase ^= 1;
      shared.tile = info;
      if (info.block_begin >= info.block_end) {
        barrier_arrive(&shared.q_full);  // nothing to load: the consumers write zeros
        continue;
      }
      barrier_arrive_expect_tx(&shared.q_full, Config::kQBytes);
      Tensor gQ = local_tile(mQ(_, _, tile.head, tile.batch), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             make_coord(tile.block, _0{}));
      copy(params.tma_q.with(shared.q_full, 0, TMA::CacheHintSm90::EVICT_FIRST), tma_q.partition_S(gQ), tQsQ);

      const int32_t kv_head = tile.head / params.kv_group;
      Tensor gK = local_tile(mK(_, _, kv_head, tile.batch), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));
      Tensor gV = local_tile(mV(_, _, kv_head, tile.batch), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));
      Tensor tKgK = tma_k.partition_S(gK);
      Tensor tVgV = tma_v.partition_S(gV);
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

  // ------------------------------------------------------------------------------------------------------
  CUTE_DEVICE static void consume(Params const& params, SharedStorage& shared, Pipeline& pipeline_k,
                                  Pipeline& pipeline_v) {
    const int consumer_thread = threadIdx.x - kWarpGroupThreads;
    const int consumer_warp_group = consumer_thread / kWarpGroupThreads;
    const int thread_in_group = consumer_thread % kWarpGroupThreads;

    Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Config::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Config::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Config::SmemLayoutVt{});

    typename Config::TiledMmaQK mma_qk;
    typename Config::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(consumer_thread);
    auto thr_pv = mma_pv.get_thread_slice(consumer_thread);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ(_, _, 0));  // (MMA, MMA_M, MMA_K) descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);           // (MMA, MMA_N, MMA_K, stage)
    Tensor tOrVt = thr_pv.partition_fragment_B(sVt);         // (MMA, MMA_N, MMA_K, stage)

    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor scores = make_tensor(tSrS.data(), accumulator_rowcol(tSrS.layout()));
    Tensor acc_o = make_tensor(tOrO.data(), accumulator_rowcol(tOrO.layout()));
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor score_coord = make_tensor(tScS.data(), accumulator_rowcol(tScS.layout()));
    Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor o_coord = make_tensor(tOcO.data(), accumulator_rowcol(tOcO.layout()));
    constexpr int kRows = decltype(size<0>(scores))::value;
    static_assert(kRows == 2);

    PipelineState k_state;
    PipelineState v_state;
    uint32_t q_full_phase = 0;
    OnlineSoftmax<kRows> softmax;

    for (int32_t t = blockIdx.x; t < params.scheduler.num_tiles(); t += gridDim.x) {
      const TileCoord tile = params.scheduler.decode(t);
      const int32_t q0 = tile.block * kBlockM;
      barrier_wait(&shared.q_full, q_full_phase);
      q_full_phase ^= 1;
      const typename Config::TileInfo info = shared.tile;

      // The key interval of each of this thread's rows (media: two index loads, overlapped with the GEMM).
      int32_t lo[kRows], hi[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const IndexRange keys = Mask::row_keys(params.mask, tile.batch, q0 + get<0>(score_coord(r, 0)));
        lo[r] = keys.begin;
        hi[r] = keys.end;
      }
      softmax.reset();
      clear(tOrO);

      const int32_t num_blocks = info.block_end - info.block_begin;
      auto needs_mask = [&](int32_t n) {
        return !(info.full_begin <= n * kBlockN && (n + 1) * kBlockN <= info.full_end);
      };
      // Scores of block n -> probabilities in `scores`; returns the output correction factors.
      auto softmax_block = [&](int32_t n, float (&correction)[kRows]) {
        if (needs_mask(n)) mask_scores(scores, score_coord, n * kBlockN, lo, hi, params.masked_score);
        softmax.exponentiate(scores, params.scale_log2, params.negative_scale, correction);
      };

      if (num_blocks > 0) {
        if constexpr (kFwdOverlap) {
          // Block j = 0 alone, then S_{j} = Q K_j^T overlapped with O += P_{j-1} V_{j-1}.
          int32_t n = info.block_end - 1;
          pipeline_k.consumer_wait(k_state);
          wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, k_state.index()), tSrS);
          warpgroup_wait<0>();
          pipeline_k.consumer_release(k_state);
          ++k_state;
          if (num_blocks == 1) barrier_arrive(&shared.q_empty);
          float correction[kRows];
          softmax_block(n, correction);
          Tensor probs = convert_fragment<Element>(tSrS);
          Tensor tOrP = make_tensor(probs.data(), accumulator_as_operand_a(probs.layout()));

          for (--n; n >= info.block_begin; --n) {
            pipeline_k.consumer_wait(k_state);
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, k_state.index()), tSrS);
            pipeline_v.consumer_wait(v_state);
            wgmma_issue<false, true>(mma_pv, tOrP, tOrVt(_, _, _, v_state.index()), tOrO);
            warpgroup_wait<1>();  // S ready; P V still running
            pipeline_k.consumer_release(k_state);
            ++k_state;
            if (n == info.block_begin) barrier_arrive(&shared.q_empty);
            softmax_block(n, correction);
            warpgroup_wait<0>();
            pipeline_v.consumer_release(v_state);
            ++v_state;
            scale_rows(acc_o, correction);
            Tensor next = convert_fragment<Element>(tSrS);
            copy(next, probs);
          }
          pipeline_v.consumer_wait(v_state);
          wgmma_issue<false, true>(mma_pv, tOrP, tOrVt(_, _, _, v_state.index()), tOrO);
          warpgroup_wait<0>();
          pipeline_v.consumer_release(v_state);
          ++v_state;
        } else {
          for (int32_t n = info.block_end - 1; n >= info.block_begin; --n) {
            pipeline_k.consumer_wait(k_state);
            wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, k_state.index()), tSrS);
            warpgroup_wait<0>();
            pipeline_k.consumer_release(k_state);
            ++k_state;
            if (n == info.block_begin) barrier_arrive(&shared.q_empty);
            float correction[kRows];
            softmax_block(n, correction);
            scale_rows(acc_o, correction);
            Tensor probs = convert_fragment<Element>(tSrS);
            Tensor tOrP = make_tensor(probs.data(), accumulator_as_operand_a(probs.layout()));
            pipeline_v.consumer_wait(v_state);
            wgmma_issue<false, true>(mma_pv, tOrP, tOrVt(_, _, _, v_state.index()), tOrO);
            warpgroup_wait<0>();
            pipeline_v.consumer_release(v_state);
            ++v_state;
          }
        }
      } else {
        barrier_arrive(&shared.q_empty);
      }

      // Epilogue: normalise, store O through shared memory, write the LSE of this thread's rows.
      float inv_sum[kRows], lse[kRows];
      softmax.finalize(inv_sum, lse);
      scale_rows(acc_o, inv_sum);
      const int64_t out_offset = static_cast<int64_t>(tile.batch) * params.out_strides.batch +
                                 static_cast<int64_t>(q0) * params.out_strides.row +
                                 static_cast<int64_t>(tile.head) * params.out_strides.head;
      store_warpgroup_rows<kHeadDim>(acc_o, o_coord, shared.o.data(), consumer_warp_group, thread_in_group,
                                     params.out + out_offset, params.out_strides.row,
                                     params.mask.seqlen_q - q0);
      if (thread_in_group % 4 == 0) {
        float* lse_row = params.lse + (static_cast<int64_t>(tile.batch) * params.heads_q + tile.head) *
                                          params.mask.seqlen_q;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const int32_t q = q0 + get<0>(score_coord(r, 0));
          if (q < params.mask.seqlen_q) lse_row[q] = lse[r];
        }
      }
    }
  }
};

template <class Config, class Mask>
__global__ void __launch_bounds__(Config::kThreads, 1)
    attention_fwd_kernel(CUTE_GRID_CONSTANT FwdParams<Config> const params) {
  using Kernel = FwdKernel<Config, Mask>;
  using Pipeline = typename Config::Pipeline;
  extern __shared__ __align__(1024) char shared_raw[];  // 128-byte swizzled tiles need 1024-byte alignment
  auto& shared = *reinterpret_cast<typename Config::SharedStorage*>(shared_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
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

// ---------------------------------------------------------------------------------------------------------
// Host launcher.

template <class Element, int kHeadDim, class Mask>
struct FwdConfigFor {
  static constexpr AttentionTiles kTiles = attention_tiles(Mask::kKind);
  using type = FwdConfig<Element, kHeadDim, kTiles.fwd_block_m, kTiles.fwd_block_n, 2>;
};

template <class Element, int kHeadDim, class Mask>
cudaError_t launch_attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream) {
  using Config = typename FwdConfigFor<Element, kHeadDim, Mask>::type;
  const AttentionProblem& p = args.problem;
  FwdParams<Config> params{
      make_tma_load<Element>(args.q, gmem_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch), gmem_stride(args.q_strides),
                             take<0, 2>(typename Config::SmemLayoutQ{})),
      make_tma_load<Element>(args.k, gmem_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch),
                             gmem_stride(args.k_strides), take<0, 2>(typename Config::SmemLayoutK{})),
      make_tma_load<Element>(args.v, gmem_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch),
                             gmem_stride(args.v_strides), take<0, 2>(typename Config::SmemLayoutK{})),
      gmem_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch),
      gmem_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch),
      static_cast<Element*>(args.out),
      args.out_strides,
      args.lse,
      MaskContext{p.seqlen_q, p.seqlen_k, args.media},
      TileScheduler{(p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM, p.heads_q, p.batch,
                    Mask::kKind == AttentionMaskKind::kCausal},
      p.heads_q,
      p.heads_q / p.heads_kv,
      args.softmax_scale * kLog2e,
      args.softmax_scale < 0.f ? INFINITY : -INFINITY,
      args.softmax_scale < 0.f,
  };
  const int32_t num_tiles = params.scheduler.num_tiles();
  if (num_tiles == 0) return cudaSuccess;
  auto kernel = attention_fwd_kernel<Config, Mask>;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSharedBytes);
  if (status != cudaSuccess) return status;
  kernel<<<persistent_grid(num_tiles, args.num_sms), Config::kThreads, Config::kSharedBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flamingo_fast::attention
