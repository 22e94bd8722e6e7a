// Compile-time shape of the SM90 forward kernel for one (dtype, dqk, dv): tiles, shared-memory
// layouts, the two tiled wgmmas and the TMA copy types.
//
// One CTA = a producer warpgroup (warpgroup 0 issues the TMA loads) and kBlockM / 64 consumer
// warpgroups owning 64 query rows each (2 for 128-row blocks, 3 for hd64's 192). Shared memory holds
// kQStages tiles of Q (two where they fit) and kStages tiles of K and V.
//
// kClusterM = 2 pairs CTAs in a 2x1x1 cluster that compute query blocks 2i and 2i + 1 of one (head,
// batch) and so read the same K and V blocks: each loads half of every K and V block and multicasts
// it to both, halving the K/V traffic from L2 (launch.cuh picks it; kernel.cuh has the protocol).
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/pipeline/pipeline.hpp>

namespace flexattn::sm90 {

using namespace cute;

// Tile shape per (dqk, dv), plain or narrow (kNarrow), and which calls take the narrow tiles: always
// causal/windowed rows of at most 1024 keys (launch.cuh's kShortRowKeys), and as the flags below say
// other short rows and long causal/windowed ones.
// - kBlockN: the largest key tile for which Q + 2 stages of K and V fit in the 227 KB of shared
//   memory and the O accumulator (dv/2 fp32 registers per thread), the scores (kBlockN/2) and P
//   (kBlockN/4) fit in 240 registers. 192/192 with 112: 48 + 2 x 42 + 2 x 42 = 216 KB; 256/256
//   with 80: 64 + 2 x 40 + 2 x 40 = 224 KB; dv 256 keeps 80 for the registers.
// - hd128 takes 176-key tiles (fewer softmax passes per key: 0.93x -> 1.03x cuDNN at 16k on an
//   H200) unless kNarrow: causal/windowed calls keep 128 so fewer keys are wasted on the diagonal,
//   and short rows keep 128 so a second Q buffer fits (kQStages).
// - 112- and 80-key tiles pad 512 keys to 560. The narrow tiles of (192, 128) take 128 keys (48 + 2 x
//   80 = 208 KB) and those of dv 256 64. Short rows, H100, 2 rounds (RESULTS_cuda.md session 15):
//   (192, 128) 512 503 -> 527 TFLOP/s, causal 287 - 291 -> 314 - 320 (with O stored from registers:
//   no room for the O buffer beside 128-key stages); (128, 256) 512 458 -> 498,
//   causal 512 / 1024 285 - 295 / 416 - 422 -> 322 / 459; hd256 512 490 -> 503, causal 266 - 275 ->
//   288. Long rows keep the plain tiles: 8k (192, 128) ran 1.6 % slower on 128 keys, causal 8k dv 256
//   2 - 4 % on 64. (192, 192) on 64 keys: causal 512 +5 %, dense 512 and 1024 -3 - 5 %, so none.
// - hd64 (dqk = dv = 64) does 2 x 128 FLOPs per exp2, so the exp2 units bind as much as the tensor
//   cores: a third consumer warpgroup (192 query rows) gives the ping-pong more softmax to hide.
//   Its narrow tiles keep 128 rows: 192-row blocks pad 512 rows to 576 and 1024 to 1152, and mask
//   more of the diagonal. hd64 causal 512 / 1024: 0.80 / 0.83 -> 0.88 / 0.92 - 0.95x cuDNN, (32, 64) 0.85 /
//   0.87 -> 0.88 - 0.90 / 0.92 - 0.95x; dense 512 - 1024 and causal 2048+ ran 1 - 12 % slower on
//   them, so only short masked rows take them (H100, session 15).
template <int kDQK, int kDV, bool kNarrow>
struct TileConfig {
  static constexpr bool kSmallDims = kDQK <= 128 && kDV <= 128;
  static constexpr bool kHd64 = kDQK <= 64 && kDV <= 64;
  static constexpr int kBlockM = kHd64 && !kNarrow ? 192 : 128;
  static constexpr int kBlockN = [] {
    if (kDQK == 128 && kDV == 128) return kNarrow ? 128 : 176;
    if (kSmallDims) return 128;
    if (kDV <= 128) return kNarrow ? 128 : 112;  // (192, 128)
    if (kDV <= 192) return 112;
    return kNarrow ? 64 : 80;
  }();
  static constexpr int kStages = 2;
  // Besides short masked rows, the narrow tiles serve short dense rows (all but hd64) and long masked
  // rows (hd128).
  static constexpr bool kNarrowForShortDenseRows = !kHd64;
  static constexpr bool kNarrowForLongMaskedRows = kDQK == 128 && kDV == 128;
  // Whether a call takes the narrow tiles: rows of at most kShortRowKeys keys (launch.cuh) or longer,
  // causal/windowed or not. The one statement of the rule, for launch.cuh and FwdTraits.
  static constexpr bool takes_narrow(bool short_rows, bool masked) {
    return short_rows ? masked || kNarrowForShortDenseRows : masked && kNarrowForLongMaskedRows;
  }
};

// Whether narrow-tile calls need their own instantiation.
template <int kDQK, int kDV>
constexpr bool kNarrowHasOwnTiles = TileConfig<kDQK, kDV, true>::kBlockN != TileConfig<kDQK, kDV, false>::kBlockN ||
                                    TileConfig<kDQK, kDV, true>::kBlockM != TileConfig<kDQK, kDV, false>::kBlockM;

template <class Element_, int kDQK_, int kDV_, bool kNarrow_, int kClusterM_ = 1>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kDQK = kDQK_;
  static constexpr int kDV = kDV_;
  static constexpr int kClusterM = kClusterM_;
  static_assert(kClusterM == 1 || kClusterM == 2, "K/V are shared by at most a pair of CTAs");
  using Config = TileConfig<kDQK, kDV, kNarrow_>;
  static constexpr int kBlockM = Config::kBlockM;
  static constexpr int kBlockN = Config::kBlockN;
  static constexpr int kStages = Config::kStages;
  static constexpr int kNumMmaWarpGroups = kBlockM / 64;
  static constexpr int kNumMmaThreads = 128 * kNumMmaWarpGroups;
  static constexpr int kNumThreads = kNumMmaThreads + 128;
  // Whether launch.cuh runs short dense rows (<= 1024 keys, no mask) on this kernel: those are the calls
  // that start some CTAs late (launch.cuh, late_start_ns), so only these kernels carry the delay's code.
  // In (192, 128)'s plain kernel, which runs only long rows, that code reordered the consumers' softmax
  // instructions and cost 2.5 % at 2k and 5 - 7 % at 8k with no CTA waiting (H100, RESULTS_cuda.md
  // session 16). Kernels with one tile shape for all rows (hd64's plain tiles among them) carry it too.
  static constexpr bool kRunsShortDenseRows =
      kClusterM == 1 && (!kNarrowHasOwnTiles<kDQK, kDV> || kNarrow_ == Config::takes_narrow(true, false));
  // setmaxnreg budgets, which must sum to no more than the CTA was launched with (168 x 384 = 64512
  // for two consumer warpgroups, 128 x 512 = 65536 for three), or the consumers' increase deadlocks.
  // Two: the producer thread needs 32 for the tile ring (at 24 its per-tile setup spilled 48 - 232
  // bytes), leaving 232 per consumer thread (32 x 128 + 232 x 256 = 63488); dqk = dv = 256 needs 240
  // in the consumers (232 spilled 32 bytes in their loop), so there the producer keeps 24 and spills
  // its setup instead. Three: 32 x 128 + 160 x 384 = 65536.
  static constexpr bool kWideConsumers = kNumMmaWarpGroups == 2 && kDQK == 256 && kDV == 256;
  static constexpr int kProducerRegs = kWideConsumers ? 24 : 32;
  static constexpr int kConsumerRegs = kNumMmaWarpGroups == 2 ? (kWideConsumers ? 240 : 232) : 160;

  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kDQK>>;
  using TileShapePV = Shape<Int<kBlockM>, Int<kDV>, Int<kBlockN>>;
  using AtomLayout = Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>;
  // Q is the register A operand of S = Q K^T (loaded with ldmatrix once a tile) where registers allow:
  // two consumer warpgroups, key tiles of at most 128, dqk <= 128 and dv <= 128 (32 more registers a
  // thread; with hd128's 176-key tiles, the three-warpgroup 160-register budget or (128, 256)'s
  // 128-register O accumulator ptxas serialised the wgmmas, and at (128, 256) spilled 128 bytes too:
  // 469 -> 671 TFLOP/s at 8k once Q stayed in shared memory, H100, RESULTS_cuda.md session 14).
  // The S GEMM then reads only K from shared memory, and the Q buffer is free after the tile's first
  // GEMM. H100, 3 rounds each: (96, 96) and (64, 128) at 16k +2 - 4 %, hd128 at 512 unchanged.
  static constexpr bool kRegisterQ = kNumMmaWarpGroups == 2 && kBlockN <= 128 && kDQK <= 128 && kDV <= 128;
  using TiledMmaQK = decltype(make_tiled_mma(
      std::conditional_t<kRegisterQ, decltype(GMMA::rs_op_selector<Element, Element, float, TileShapeQK>()),
                         decltype(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>())>{},
      AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));

  template <int kRows, int kCols>
  using SmemAtom = decltype(cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kRows>, Int<kCols>>());
  // Q is double-buffered where shared memory allows, so the producer loads the next tile's Q while the
  // consumers still use this one (at seqlen 512 a tile has 3 - 4 key blocks, and a Q load that waits for
  // the last Q K^T of the previous tile sat at every tile's start). It does not fit beside hd128's
  // 176-key tiles (208 + 32 KB) nor with dqk >= 192 ((192, 128), (192, 192), (256, 256)).
  static constexpr int kSmemBytesKV = kStages * kBlockN * (kDQK + kDV) * int(sizeof(Element));
  static constexpr int kSmemBytesQ = kBlockM * kDQK * int(sizeof(Element));
  static constexpr int kQStages = 2 * kSmemBytesQ + kSmemBytesKV + 2048 <= 227 * 1024 ? 2 : 1;
  // O leaves through shared memory and a TMA store (one per consumer warpgroup, its 64 rows) where a
  // buffer fits beside Q and K/V. Storing it from the wgmma accumulator took ~2000 cycles a tile at
  // seqlen 512, hd128 (quad shuffles and 8-byte stores; benchmarks/tile_timeline.py), against a
  // 4-block key loop of ~10000: the TMA store leaves the consumers at once. Varlen calls keep the
  // register store (a TMA store would write past its sequence's rows into the next one's).
  static constexpr int kSmemBytesO = kBlockM * kDV * int(sizeof(Element));
  static constexpr bool kSmemEpilogue = kQStages * kSmemBytesQ + kSmemBytesKV + kSmemBytesO + 2048 <= 227 * 1024;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom<kBlockM, kDQK>{}, Shape<Int<kBlockM>, Int<kDQK>, Int<kQStages>>{}));
  using SmemLayoutO = decltype(tile_to_shape(SmemAtom<64, kDV>{}, Shape<_64, Int<kDV>, Int<kNumMmaWarpGroups>>{}));
  using SmemLayoutK = decltype(tile_to_shape(SmemAtom<kBlockN, kDQK>{}, Shape<Int<kBlockN>, Int<kDQK>, Int<kStages>>{}));
  using SmemLayoutV = decltype(tile_to_shape(SmemAtom<kBlockN, kDV>{}, Shape<Int<kBlockN>, Int<kDV>, Int<kStages>>{}));
  // V^T as the MN-major B operand of P @ V: the same bytes, (dv, n, stage) coordinates.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutV{}, make_ordered_layout(Shape<Int<kDV>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;
  // The K/V pipelines' cluster: a stage is free once the consumers of every CTA that receives it
  // released it (PipelineTmaAsync counts one arrival per consumer warpgroup per CTA).
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;

  struct SharedStorage {
    array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    array_aligned<Element, kSmemEpilogue ? cosize_v<SmemLayoutO> : 8, kSmemEpilogue ? 1024 : 16> o;
    cutlass::arch::ClusterTransactionBarrier barrier_q_full[kQStages];  // Q landed (TMA transaction count)
    cutlass::arch::ClusterBarrier barrier_q_empty[kQStages];            // every consumer thread is done with Q
    // The producer draws tile indices and hands them to the consumers through a 2-slot ring.
    int tile_index[2];
    cutlass::arch::ClusterBarrier tile_full[2];   // the producer wrote the slot
    cutlass::arch::ClusterBarrier tile_empty[2];  // every consumer thread read it
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
  };

  // Global tensors as TMA sees them: (rows, dim, heads, batch), dim contiguous.
  using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kDQK>>{}, _1{}));
  // In a cluster each CTA loads 1 / kClusterM of a K or V block and multicasts it to every CTA of
  // the cluster: CuTe cuts the box (64 columns, one 128-byte swizzle span, by kBlockN rows) in rows,
  // so at hd128 (176-key tiles: launch.cuh runs clusters on those only) CTA r issues the two column
  // halves' rows [r, r + 1) x 88 (whole 1024-byte swizzle atoms, as the TMA destination needs).
  using TmaLoadKV = std::conditional_t<kClusterM == 1, SM90_TMA_LOAD, SM90_TMA_LOAD_MULTICAST>;
  using TmaK = decltype(make_tma_copy(TmaLoadKV{}, GmemTensor{}, take<0, 2>(SmemLayoutK{}),
                                      Shape<Int<kBlockN>, Int<kDQK>>{}, Int<kClusterM>{}));
  using TmaV = decltype(make_tma_copy(TmaLoadKV{}, GmemTensor{}, take<0, 2>(SmemLayoutV{}),
                                      Shape<Int<kBlockN>, Int<kDV>>{}, Int<kClusterM>{}));
  using GmemTensorO = decltype(make_tensor(make_gmem_ptr(static_cast<Element*>(nullptr)), GmemShape{}, GmemStride{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorO{}, take<0, 2>(SmemLayoutO{}), Shape<_64, Int<kDV>>{}, _1{}));
  // The 64-row (one consumer warpgroup) slice of the P V accumulator, for the stmatrix partition.
  using TiledMmaPVOneWarpGroup = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDV>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>()));
  static constexpr uint32_t kTmaBytesQ = size(take<0, 2>(SmemLayoutQ{})) * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = size(take<0, 2>(SmemLayoutK{})) * sizeof(Element);
  static constexpr uint32_t kTmaBytesV = size(take<0, 2>(SmemLayoutV{})) * sizeof(Element);
};

}  // namespace flexattn::sm90
