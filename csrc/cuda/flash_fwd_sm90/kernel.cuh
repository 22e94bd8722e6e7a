// The SM90 attention forward kernel: TMA loads by a producer warpgroup, wgmma by two or three
// consumer warpgroups (64 query rows each), online softmax in registers, P fed to the second GEMM
// from registers (and Q to the first where kRegisterQ). A persistent CTA walks (query block, head,
// batch) tiles (tile_scheduler.cuh).
//
// With Traits::kClusterM = 2 the grid is made of 2-CTA clusters whose CTAs compute query blocks 2i
// and 2i + 1 of one (head, batch) and so read the same key blocks in the same order: each CTA's
// producer loads half of every K and V block and multicasts it to both CTAs. A CTA's K/V stage then
// fills from two producers (each CTA's full barrier expects the whole block's bytes; the peer's half
// may land before the local producer's arrive, which only drives the transaction count below zero
// for a while) and empties only when the consumers of both CTAs have released it (PipelineTmaAsync
// with a 2x1x1 cluster shape: every consumer warpgroup arrives on the stage's empty barrier of
// both CTAs), so neither producer overwrites a stage the peer still reads.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>

#include "common/mask.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"
#include "common/tile_scheduler.cuh"
#include "flash_fwd_sm90/kernel_traits.cuh"
#include "flash_fwd_sm90/params.h"
#include "flash_fwd_sm90/wgmma.cuh"

namespace flexattn::sm90 {

using namespace cute;

template <class Traits>
struct KernelParams {
  FwdParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  typename Traits::TmaV tma_v;
  typename Traits::TmaO tma_o;
  // Divisors fixed for the launch (tile_scheduler.cuh says why they are precomputed): query blocks per
  // head, query heads, and query heads per K head and per V head.
  cutlass::FastDivmod m_blocks, heads_q, q_per_k, q_per_v;
  // How long the CTAs with one tile fewer than the rest wait before their first load (launch.cuh says why); 0: none.
  int late_start_ns;
};

// Returns after at least `ns` nanoseconds (of the global timer), sleeping in between.
__device__ inline void sleep_ns(int ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < uint64_t(ns));
}

// Stores the LSE of this thread's rows (one thread of each quad; rows past the sequence skipped).
template <class Traits>
__device__ void store_lse(FwdParams const& p, float const (&lse)[2], SeqInfo const& seq, TileCoord const& tile,
                          int mma_tidx) {
  if (threadIdx.x % 4 != 0) return;
  typename Traits::TiledMmaPV tiled_mma_pv;
  Tensor coords = tiled_mma_pv.get_thread_slice(mma_tidx).partition_C(
      make_identity_tensor(select<0, 1>(typename Traits::TileShapePV{})));
  Tensor coords_rc = make_tensor(coords.data(), rowcol(coords.layout()));
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < size<0>(coords_rc); ++r) {
    int const row = tile.m_block * Traits::kBlockM + get<0>(coords_rc(r, 0));
    if (row < seq.seqlen_q) {
      p.lse[seq.batch_coord * p.lse_batch_stride + tile.head * p.lse_head_stride + seq.row0_q + row] = lse[r];
    }
  }
}

// Stores this consumer warpgroup's 64 rows of O (normalised, in registers) through its shared-memory
// buffer sO with one TMA store, which runs on after the call returns (and clips rows past the
// sequence and columns past dv). The buffer is rewritten only once the previous store has read it.
template <class Traits, class AccO, class SmemO>
__device__ void store_output_tma(KernelParams<Traits> const& kp, AccO const& acc_o, SmemO sO, SeqInfo const& seq,
                                 TileCoord const& tile, int consumer, int barrier) {
  using Element = typename Traits::Element;
  FwdParams const& p = kp.p;
  int const wg_tidx = threadIdx.x % 128;
  Tensor out = convert_fragment<Element>(acc_o);
  if (wg_tidx == 0) tma_store_wait<0>();
  cutlass::arch::NamedBarrier::sync(128, barrier);
  auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, typename Traits::TiledMmaPVOneWarpGroup{});
  auto thr_copy = smem_copy.get_thread_slice(wg_tidx);
  copy(smem_copy, thr_copy.retile_S(out), thr_copy.partition_D(sO));
  cutlass::arch::fence_view_async_shared();  // the TMA unit reads what the threads wrote
  cutlass::arch::NamedBarrier::sync(128, barrier);
  if (wg_tidx == 0) {
    Tensor mO = kp.tma_o.get_tma_tensor(make_shape(p.rows_q, p.dv, p.heads_q, p.batch));
    Tensor gO = local_tile(mO(_, _, tile.head, seq.batch_coord), Shape<_64, Int<Traits::kDV>>{},
                           make_coord(tile.m_block * Traits::kNumMmaWarpGroups + consumer, _0{}));
    auto [tOgO, tOsO] = tma_partition(kp.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO), group_modes<0, 2>(gO));
    copy(kp.tma_o, tOsO, tOgO);
    tma_store_arrive();
  }
}

// Stores this thread's rows of O (normalised, in registers), skipping rows past the sequence and
// columns past dv: the epilogue of varlen calls and of tile shapes with no room for an O buffer
// (store_output_tma otherwise).
//
// In the wgmma accumulator a quad of threads (one row) holds each 8-column block as 4 column pairs,
// so storing pairs leaves every 32-byte sector to two half-filled stores: at seqlen 512, hd128, ncu
// counted 2.1M excess of 4.2M sectors, with L2 (71%) the busiest unit. Over each 16 columns the quad
// trades values by shuffles so that each thread holds 4 consecutive columns: one 8-byte store each,
// and a quad writes 32 contiguous bytes. (out's strides are multiples of 8 elements: the binding.)
template <class Traits, class AccO>
__device__ void store_output(FwdParams const& p, AccO& acc_o, SeqInfo const& seq, TileCoord const& tile, int mma_tidx) {
  using Element = typename Traits::Element;
  static_assert(Traits::kDV % 16 == 0, "the quad exchange works on 16-column groups");
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto thr_pv = tiled_mma_pv.get_thread_slice(mma_tidx);
  Tensor coords = thr_pv.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapePV{})));
  Tensor coords_rc = make_tensor(coords.data(), rowcol(coords.layout()));
  Tensor out_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  Element* out_base = static_cast<Element*>(p.out) + seq.batch_coord * p.o_batch_stride + tile.head * p.o_head_stride;
  cutlass::NumericArrayConverter<Element, float, 2> convert;
  auto pack = [&](float a, float b) {
    cutlass::Array<Element, 2> const pair = convert(cutlass::Array<float, 2>{a, b});
    return reinterpret_cast<uint32_t const&>(pair);
  };
  int const lane = threadIdx.x % 32;
  int const quad_lane = lane % 4;  // holds columns 2q, 2q + 1 of every 8-column block
  // Thread q gathers columns 4q .. 4q + 3 of each 16: from the first 8-column block (q < 2) or the
  // second, pairs held by quad lanes 2q mod 4 and 2q + 1 mod 4.
  int const src_a = (lane & ~3) | ((2 * quad_lane) & 3);
  int const src_b = src_a | 1;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < size<0>(out_rc); ++r) {
    int const row = tile.m_block * Traits::kBlockM + get<0>(coords_rc(r, 0));
    bool const row_ok = row < seq.seqlen_q;  // no early exit: the whole warp takes part in the shuffles
    Element* out_row = out_base + int64_t(seq.row0_q + row) * p.o_row_stride;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(out_rc); c += 4) {
      uint32_t const first = pack(out_rc(r, c), out_rc(r, c + 1));       // columns 16g + 2q, + 1
      uint32_t const second = pack(out_rc(r, c + 2), out_rc(r, c + 3));  // columns 16g + 8 + 2q, + 1
      uint32_t const a_first = __shfl_sync(0xffffffff, first, src_a);
      uint32_t const a_second = __shfl_sync(0xffffffff, second, src_a);
      uint32_t const b_first = __shfl_sync(0xffffffff, first, src_b);
      uint32_t const b_second = __shfl_sync(0xffffffff, second, src_b);
      uint2 const mine = quad_lane < 2 ? make_uint2(a_first, b_first) : make_uint2(a_second, b_second);
      int const col = get<1>(coords_rc(r, c)) + 2 * quad_lane;  // 16g + 4q
      if (row_ok && col < p.dv) *reinterpret_cast<uint2*>(out_row + col) = mine;
    }
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1) fwd_kernel(CUTE_GRID_CONSTANT KernelParams<Traits> const kp) {
  using Element = typename Traits::Element;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr bool kCluster = Traits::kClusterM > 1;
  FwdParams const& p = kp.p;
  TileScheduler const scheduler{kp.m_blocks, kp.heads_q, p.batch,
                                /*longest_first=*/p.window_right >= 0};  // the last query blocks see the most keys

  extern __shared__ char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  int const warp_group = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);

  typename Pipeline::Params pipe_params;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kNumMmaThreads;
  pipe_params.transaction_bytes = Traits::kTmaBytesK;
  Pipeline pipeline_k(smem.pipeline_k, pipe_params, typename Traits::ClusterShape{});
  pipe_params.transaction_bytes = Traits::kTmaBytesV;
  Pipeline pipeline_v(smem.pipeline_v, pipe_params, typename Traits::ClusterShape{});
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < Traits::kQStages; ++stage) {
      smem.barrier_q_full[stage].init(1);
      smem.barrier_q_empty[stage].init(Traits::kNumMmaThreads);
    }
    for (int slot = 0; slot < 2; ++slot) {
      smem.tile_full[slot].init(1);
      smem.tile_empty[slot].init(Traits::kNumMmaThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kCluster) {
    // The peer multicasts into this CTA's shared memory and arrives on its K/V barriers: neither
    // may happen before this CTA initialised them (the fences above make the inits visible
    // cluster-wide; the cluster barrier also orders this CTA's threads, as __syncthreads would).
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
  } else {
    __syncthreads();
  }

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

  // The CTA loops over tiles (a persistent grid of one CTA per SM): the producer draws each next
  // tile (TileScheduler::next), passes its index to the consumers through the ring, and loads its
  // Q, K and V while the consumers still finish the current one. Both sides walk the same tiles and
  // skip the same empty ones, so their pipeline states and Q buffer counters stay in step. An index past the
  // last tile ends both loops. (The asm memory clobbers keep the compiler from moving the index's
  // shared-memory store or load across the barrier instructions, which declare none.)
  if (warp_group == 0) {
    // Producer: one thread issues every TMA load; the rest of the warpgroup just gives its
    // registers to the consumers.
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x != 0) return;
    int const batch_extent = p.cu_seqlens_q != nullptr ? 1 : p.batch;
    Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.rows_q, p.dqk, p.heads_q, batch_extent));
    Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.rows_k, p.dqk, p.heads_k, batch_extent));
    Tensor mV = kp.tma_v.get_tma_tensor(make_shape(p.rows_k, p.dv, p.heads_v, batch_extent));
    // The descriptors live in kernel parameters; fetching them now takes that latency off the first loads.
    cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
    // L2 policy per load: each K and V block is read by every query block of its head (4 CTAs at once at
    // seqlen 512, a whole wave at 16k), Q by one CTA once. So K/V lines stay (evict last) and Q's go first.
    // H100, 3 rounds against the default policy: hd256 512 470 - 477 -> 482 - 485 TFLOP/s, 16k 741 -> 744 - 778;
    // hd128 and hd64 within noise.
    constexpr auto kKeepInL2 = TMA::CacheHintSm90::EVICT_LAST;
    constexpr auto kReadOnce = TMA::CacheHintSm90::EVICT_FIRST;
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    // K/V loads land in every CTA of the cluster (0: not a multicast).
    constexpr uint16_t kKVMask = kCluster ? (1 << Traits::kClusterM) - 1 : 0;
    SlotCounter<Traits::kQStages> q_slot;
    RingPos ring;
    // Static schedules of short dense rows only (launch.cuh sets no delay otherwise).
    if constexpr (Traits::kRunsShortDenseRows) {
      if (kp.late_start_ns > 0 && int(blockIdx.x) >= scheduler.num_tiles() % int(gridDim.x)) sleep_ns(kp.late_start_ns);
    }
    // The next tile is drawn after this one's loads are issued: the producer then waits for free
    // K/V stages anyway, and the index is not live through the load loop (the producer thread runs
    // on 24 - 32 registers; kernel_traits.cuh).
    //
    // Clusters take the static schedule, which pairs their CTAs' tiles (tile_scheduler.cuh); launch.cuh
    // launches them only where p.tile_counter is null, and the null constant drops the counter path.
    for (int index = blockIdx.x;;
         ring.advance(), index = scheduler.next(kCluster ? nullptr : p.tile_counter, ring.uses)) {
      smem.tile_empty[ring.slot()].wait(ring.phase() ^ 1);  // the consumers have read the slot's last index
      asm volatile("" ::: "memory");
      smem.tile_index[ring.slot()] = index;
      asm volatile("" ::: "memory");
      smem.tile_full[ring.slot()].arrive();
      if (index >= scheduler.num_tiles()) break;
      TileCoord const tile = scheduler.tile(index);
      SeqInfo const seq(p, tile.batch);
      if (tile.m_block * kBlockM >= seq.seqlen_q) continue;  // varlen: past this sequence's end
      auto const [n_min, n_max] =
          Mask<kBlockM, kBlockN>{seq.seqlen_q, seq.seqlen_k, p.window_left, p.window_right}.n_block_range(tile.m_block);
      if (n_min >= n_max) continue;
      int const head_k = kp.q_per_k.div(tile.head);
      int const head_v = kp.q_per_v.div(tile.head);
      Tensor gQ = local_tile(domain_offset(make_coord(seq.row0_q, _0{}), mQ(_, _, tile.head, seq.batch_coord)),
                             Shape<Int<kBlockM>, Int<Traits::kDQK>>{}, make_coord(tile.m_block, _0{}));
      Tensor gK = local_tile(domain_offset(make_coord(seq.row0_k, _0{}), mK(_, _, head_k, seq.batch_coord)),
                             Shape<Int<kBlockN>, Int<Traits::kDQK>>{}, make_coord(_, _0{}));  // (N, D, n)
      Tensor gV = local_tile(domain_offset(make_coord(seq.row0_k, _0{}), mV(_, _, head_v, seq.batch_coord)),
                             Shape<Int<kBlockN>, Int<Traits::kDV>>{}, make_coord(_, _0{}));
      auto [tQgQ, tQsQ] = tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      // In a cluster, this CTA's half of each K/V block (its rank's rows; kernel_traits.cuh).
      auto const kv_rank = [] {
        if constexpr (kCluster) return int(cute::block_rank_in_cluster());
        else return _0{};
      }();
      using KVRanks = Layout<Int<Traits::kClusterM>>;
      auto [tKgK, tKsK] = tma_partition(kp.tma_k, kv_rank, KVRanks{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(kp.tma_v, kv_rank, KVRanks{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      // K first: with one Q buffer, Q waits for the previous tile's last Q K^T (its first, with Q in
      // registers), and the consumers need this tile's first K tile as soon as Q lands.
      pipeline_k.producer_acquire(write);
      copy(kp.tma_k.with(*pipeline_k.producer_get_barrier(write), kKVMask, kKeepInL2), tKgK(_, n_max - 1),
           tKsK(_, write.index()));
      // the consumers are done with the Q last loaded into this buffer (kQStages tiles ago)
      smem.barrier_q_empty[q_slot.slot()].wait(q_slot.phase() ^ 1);
      auto& q_full = smem.barrier_q_full[q_slot.slot()];
      q_full.arrive_and_expect_tx(Traits::kTmaBytesQ);
      copy(kp.tma_q.with(reinterpret_cast<cutlass::arch::ClusterTransactionBarrier::ValueType&>(q_full), 0, kReadOnce),
           tQgQ, tQsQ(_, q_slot.slot()));
      q_slot.advance();
      for (int n_block = n_max - 1; n_block >= n_min; --n_block) {
        if (n_block != n_max - 1) {
          pipeline_k.producer_acquire(write);
          copy(kp.tma_k.with(*pipeline_k.producer_get_barrier(write), kKVMask, kKeepInL2), tKgK(_, n_block),
               tKsK(_, write.index()));
        }
        pipeline_v.producer_acquire(write);
        copy(kp.tma_v.with(*pipeline_v.producer_get_barrier(write), kKVMask, kKeepInL2), tVgV(_, n_block),
             tVsV(_, write.index()));
        ++write;
      }
    }
    if constexpr (kCluster) {
      // The peer's consumers arrive on this CTA's empty barriers until they release their last
      // stages: wait for those arrivals (the last kStages releases of each pipeline, from both
      // CTAs) so this CTA's shared memory outlives them. The peer's multicasts into this CTA have
      // all landed by then: this CTA's consumers waited for every one of them before they released.
      pipeline_k.producer_tail(write);
      pipeline_v.producer_tail(write);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    int const mma_tidx = threadIdx.x - 128;
    int const wg_tidx = threadIdx.x % 128;
    typename Traits::TiledMmaQK tiled_mma_qk;
    typename Traits::TiledMmaPV tiled_mma_pv;
    auto thr_qk = tiled_mma_qk.get_thread_slice(mma_tidx);
    auto thr_pv = tiled_mma_pv.get_thread_slice(mma_tidx);
    // Q as the A operand of S = Q K^T, indexed by Q buffer: shared-memory descriptors, or (kRegisterQ)
    // registers loaded with ldmatrix once a tile, the same registers for every buffer (stride 0).
    Tensor tSrQ_regs = thr_qk.partition_fragment_A(sQ(_, _, 0));  // (MMA, MMA_M, MMA_K)
    Tensor tSrQ = [&] {
      if constexpr (Traits::kRegisterQ) {
        return make_tensor(tSrQ_regs.data(), append(tSrQ_regs.layout(), Layout<Int<Traits::kQStages>, _0>{}));
      } else {
        return thr_qk.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K, Q buffer)
      }
    }();
    auto q_copy = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, tiled_mma_qk);
    auto thr_q_copy = q_copy.get_thread_slice(mma_tidx);
    Tensor tSsQ = thr_q_copy.partition_S(sQ);  // (CPY, CPY_M, CPY_K, Q buffer)
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
    Tensor coords_s = thr_qk.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapeQK{})));
    Tensor coords_s_rc = make_tensor(coords_s.data(), rowcol(coords_s.layout()));
    Tensor sO = make_tensor(make_smem_ptr(smem.o.data()), typename Traits::SmemLayoutO{})(_, _, warp_group - 1);
    bool const has_softcap = p.softcap > 0.f;  // s = c * tanh(s * scale / c): natural units after
    float const pre_tanh = has_softcap ? p.softmax_scale / p.softcap : 0.f;
    float const scale_log2 = float(M_LOG2E) * (has_softcap ? 1.f : p.softmax_scale);

    // Ping-pong between the consumer warpgroups (FlashAttention-3): a warpgroup issues its two
    // GEMMs only after the previous one has issued its own, so one's softmax runs under the
    // other's GEMMs. Named barrier i belongs to consumer warpgroup i, which waits on it while the
    // previous one arrives (2 x 128 threads); the last warpgroup hands the first turn to 0.
    constexpr int kConsumers = Traits::kNumMmaWarpGroups;
    int const consumer = warp_group - 1;
    auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(2 * 128, consumer); };
    auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(2 * 128, (consumer + 1) % kConsumers); };
    if (consumer == kConsumers - 1) pass_turn();

    // Frees a K/V stage. In a cluster each consumer warpgroup arrives once on the stage's empty
    // barrier in each CTA (the count PipelineTmaAsync gives a 2x1x1 cluster): thread 0 of warp r
    // signals CTA r once its warp's wgmma reads are done, as the pipeline's own consumer_release
    // does with one thread of warps 0 and 1. The target and predicate come from the thread index
    // here because the pipeline object keeps its copies in registers through the key loop, which
    // spilled 16 bytes in the 176-key consumers.
    auto release = [&](Pipeline& pipeline, typename Pipeline::SharedStorage& storage, PipelineState const& state) {
      if constexpr (kCluster) {
        static_assert(Traits::kClusterM == 2, "one signalling warp per CTA of the cluster");
        int const t = threadIdx.x % 128;
        storage.empty_barrier_[state.index()].arrive(t / 32, (t & ~32) == 0);  // t = 0 or 32: CTA 0 or 1
      } else {
        pipeline.consumer_release(state);
      }
    };
    PipelineState read_k, read_v;
    SlotCounter<Traits::kQStages> q_slot;
    for (RingPos ring;; ring.advance()) {
      smem.tile_full[ring.slot()].wait(ring.phase());
      asm volatile("" ::: "memory");
      int const index = smem.tile_index[ring.slot()];
      asm volatile("" ::: "memory");
      smem.tile_empty[ring.slot()].arrive();
      if (index >= scheduler.num_tiles()) break;
      TileCoord const tile = scheduler.tile(index);
      SeqInfo const seq(p, tile.batch);
      if (tile.m_block * kBlockM >= seq.seqlen_q) continue;
      Mask<kBlockM, kBlockN> const mask{seq.seqlen_q, seq.seqlen_k, p.window_left, p.window_right};
      auto const [n_min, n_max] = mask.n_block_range(tile.m_block);
      Tensor acc_o = partition_fragment_C(tiled_mma_pv, select<0, 1>(typename Traits::TileShapePV{}));
      clear(acc_o);
      Tensor acc_o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
      OnlineSoftmax<2> softmax(scale_log2);
      auto scores_to_probs = [&](auto& acc_s, int n_block) {
        Tensor scores = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
        if (has_softcap) {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(scores); ++i) scores(i) = p.softcap * tanhf(scores(i) * pre_tanh);
        }
        if (mask.needs_mask(tile.m_block, n_block)) mask.apply(scores, coords_s_rc, tile.m_block, n_block);
        softmax.update(scores);
      };

      if (n_min < n_max) {
        int const q_buf = q_slot.slot();
        smem.barrier_q_full[q_buf].wait(q_slot.phase());
        q_slot.advance();
        // The first P V of a tile reads key block n_max - 1. When its rows past seqlen_k come from
        // memory (varlen: the next sequence or padding; seqused_k: unused cache slots) rather than
        // TMA's zero fill, P is 0 there but 0 * NaN is not: zero those V rows in shared memory first.
        // Each consumer warpgroup does it before its first GEMM (the same zeros, so one warpgroup
        // writing while another reads is harmless) and fences them for the tensor cores. Done ahead
        // of the main loop so the loop carries no extra registers.
        if ((p.cu_seqlens_k != nullptr || p.seqused_k != nullptr) && n_max * kBlockN > seq.seqlen_k) {
          pipeline_v.consumer_wait(read_v);
          Tensor sV_stage = sV(_, _, read_v.index());
          int const first = seq.seqlen_k - (n_max - 1) * kBlockN;  // first row past the keys
          for (int i = wg_tidx; i < (kBlockN - first) * Traits::kDV; i += 128) {
            sV_stage(first + i / Traits::kDV, i % Traits::kDV) = Element(0.f);
          }
          cutlass::arch::fence_view_async_shared();
          cutlass::arch::NamedBarrier::sync(128, kConsumers + consumer);  // the warpgroup's writes are done
        }
        if constexpr (Traits::kRegisterQ) copy(q_copy, tSsQ(_, _, _, q_buf), thr_q_copy.retile_D(tSrQ_regs));
        auto acc_s = partition_fragment_C(tiled_mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));
        pipeline_k.consumer_wait(read_k);
        wait_turn();
        wgmma_gemm<true, Traits::kRegisterQ, 0>(tiled_mma_qk, tSrQ(_, _, _, q_buf), tSrK(_, _, _, read_k.index()), acc_s);
        pass_turn();
        if constexpr (Traits::kRegisterQ) smem.barrier_q_empty[q_buf].arrive();  // Q lives in registers now
        release(pipeline_k, smem.pipeline_k, read_k);
        ++read_k;
        scores_to_probs(acc_s, n_max - 1);
        Tensor probs = convert_fragment<Element>(acc_s);
        Tensor probs_a = make_tensor(probs.data(), acc_as_a_operand(probs.layout()));


        // Each iteration issues S = Q K^T for block n_block and O += P V for the block before it,
        // then computes the softmax of S while the second GEMM runs (intra-warpgroup overlap).
        for (int n_block = n_max - 2; n_block >= n_min; --n_block) {
          pipeline_k.consumer_wait(read_k);
          wait_turn();
          wgmma_gemm<true, Traits::kRegisterQ, -1>(tiled_mma_qk, tSrQ(_, _, _, q_buf), tSrK(_, _, _, read_k.index()), acc_s);
          softmax.rescale_o(acc_o_rc);
          pipeline_v.consumer_wait(read_v);
          wgmma_gemm<false, true, -1>(tiled_mma_pv, probs_a, tOrV(_, _, _, read_v.index()), acc_o);
          pass_turn();
          warpgroup_wait<1>();  // S is ready; P V still runs
          release(pipeline_k, smem.pipeline_k, read_k);
          ++read_k;
          scores_to_probs(acc_s, n_block);
          warpgroup_wait<0>();
          release(pipeline_v, smem.pipeline_v, read_v);
          ++read_v;
          probs = convert_fragment<Element>(acc_s);
        }
        if constexpr (!Traits::kRegisterQ) smem.barrier_q_empty[q_buf].arrive();  // the last S = Q K^T has completed
        softmax.rescale_o(acc_o_rc);
        pipeline_v.consumer_wait(read_v);
        wgmma_gemm<false, true, 0>(tiled_mma_pv, probs_a, tOrV(_, _, _, read_v.index()), acc_o);
        release(pipeline_v, smem.pipeline_v, read_v);
        ++read_v;
      }
      float lse[2];
      softmax.finalize(acc_o_rc, lse);
      if (Traits::kSmemEpilogue && p.cu_seqlens_q == nullptr) {
        store_output_tma(kp, acc_o, sO, seq, tile, consumer, kConsumers + consumer);
      } else {
        store_output<Traits>(p, acc_o, seq, tile, mma_tidx);
      }
      store_lse<Traits>(p, lse, seq, tile, mma_tidx);
    }
    if (Traits::kSmemEpilogue && wg_tidx == 0) tma_store_wait<0>();  // the buffer outlives the last store's reads
  }
}

// Varlen query rows past cu_seqlens_q[batch] belong to no sequence: out 0, lse -inf, as on every
// backend. A grid-stride loop over rows (4 per 128-thread block, a warp each); rows before the
// end exit at once, so a batch with no padding pays one small launch.
template <class Element>
__global__ void fill_padding_rows(FwdParams const p) {
  int const end = p.cu_seqlens_q[p.batch];
  int const lane = threadIdx.x % 32;
  for (int row = blockIdx.x * 4 + threadIdx.x / 32; row < p.rows_q; row += gridDim.x * 4) {
    if (row < end) continue;
    for (int h = 0; h < p.heads_q; ++h) {
      Element* out_row = static_cast<Element*>(p.out) + int64_t(row) * p.o_row_stride + h * p.o_head_stride;
      for (int c = lane; c < p.dv; c += 32) out_row[c] = Element(0.f);
      if (lane == 0) p.lse[h * p.lse_head_stride + row] = -INFINITY;
    }
  }
}

}  // namespace flexattn::sm90
