// wgmma helpers: a warpgroup GEMM call, and the accumulator layout views the softmax needs.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flexattn::sm90 {

using namespace cute;

// C (+)= A * B for one warpgroup tile. A comes from shared memory (descriptors) or, when
// kRegisterA, from registers (then it needs operand fences too). kWait >= 0 waits until at most
// kWait wgmma batches of this warpgroup are in flight; -1 returns at once (overlap with the caller).
template <bool kZeroInit, bool kRegisterA, int kWait, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(TiledMma& tiled_mma, TA&& tCrA, TB&& tCrB, TC& tCrC) {
  if constexpr (kRegisterA) warpgroup_fence_operand(tCrA);
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  tiled_mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tCrC);
  if constexpr (kRegisterA) warpgroup_fence_operand(tCrA);
}

// The SM90 accumulator layout ((2 cols, 2 rows, N/8), MMA_M, MMA_N) viewed as
// (rows = (2, MMA_M), cols = (2, N/8, MMA_N)), so row r of the view is one query row.
template <class Layout>
__device__ __forceinline__ constexpr auto rowcol(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3 && decltype(rank(l))::value == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same accumulator viewed as the register A operand of a 16-bit wgmma:
// ((2, 2, 2), MMA_M, N/16): pairs of N/8 chunks form one k16 block.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_as_a_operand(Layout l) {
  auto chunks = logical_divide(get<0, 2>(l), Tile<_2>{});  // (2, N/16)
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(chunks)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(chunks), get<2>(l))));
}

// A register tensor of To with `src`'s layout holding its converted values.
template <class To, class Tensor>
__device__ __forceinline__ auto convert_fragment(Tensor const& src) {
  using From = typename Tensor::value_type;
  constexpr int kNumel = decltype(size(src))::value;
  auto dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, kNumel> convert;
  *reinterpret_cast<cutlass::Array<To, kNumel>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, kNumel> const*>(src.data()));
  return dst;
}

}  // namespace flexattn::sm90
