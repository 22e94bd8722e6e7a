// Online softmax over a thread's rows of the score accumulator (FlashAttention-2's recurrence).
//
// Each query row is spread over the 4 threads of a quad (the wgmma/mma accumulator layout), so
// row maxima are all-reduced over the quad at each tile, while row sums stay per-thread partial
// sums until `finalize` (the rescale factor is quad-uniform, so partial sums rescale exactly).
// Exponentials are exp2 of scores pre-multiplied by scale * log2(e).
//
// A row's reference maximum moves only when a new score exceeds it by more than kMaxGrowthLog2
// (FlashAttention-4's conditional rescale): below that, probabilities are at most 2^8 and sums and
// O stay far inside fp32, and the O accumulator need not be rescaled. Past the first key blocks the
// maxima of long rows rarely grow that much, so most blocks skip the rescale: 128 multiplies a
// thread per block at dv = 256, beside ~40 scores a thread to exponentiate (dv 256, 16k: 691 - 696 ->
// 726 - 740 TFLOP/s on an H100, RESULTS_cuda.md, session 10).
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

namespace flexattn {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <int kRows>
struct OnlineSoftmax {
  static constexpr float kMaxGrowthLog2 = 8.f;  // probabilities up to 2^8 before the max moves

  float row_max[kRows];  // the reference maximum, raw score units (before scale_log2)
  float row_sum[kRows];  // this thread's partial sum of exp2(s * scale_log2 - max * scale_log2)
  float rescale[kRows];  // exp2((old max - new max) * scale_log2) from the last update
  bool rescaled;         // some rescale[r] != 1 since the last rescale_o
  float scale_log2;

  __device__ explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
      rescale[r] = 1.f;
    }
    rescaled = false;
  }

  // scores (kRows, cols) become unnormalised probabilities. The factor by which the O accumulator
  // must shrink for a moved maximum is kept for `rescale_o`: the caller applies it when O is not
  // being written by an in-flight wgmma.
  template <class Scores>
  __device__ void update(Scores& scores) {
    using namespace cute;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
      m = quad_max(m);
      // True when the first key arrives (-inf before); false while every key so far is masked (-inf
      // - -inf is NaN), so such a row keeps max -inf.
      if ((m - row_max[r]) * scale_log2 > kMaxGrowthLog2) {
        rescale[r] = exp2f((row_max[r] - m) * scale_log2);
        row_max[r] = m;
        rescaled = true;
      } else {
        rescale[r] = 1.f;
      }
      // Subtract 0 from a row whose max is still -inf so exp2 gives 0, not NaN.
      float const m_scaled = row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        scores(r, c) = exp2f(scores(r, c) * scale_log2 - m_scaled);
        sum += scores(r, c);
      }
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
  }

  // Skipped by the whole warp when none of its threads' maxima moved (a warp-uniform branch).
  template <class AccO>
  __device__ void rescale_o(AccO& acc_o) {
    using namespace cute;
    if (!__any_sync(0xffffffff, rescaled)) return;
    rescaled = false;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= rescale[r];
    }
  }

  // Normalises acc_o and returns each row's natural-log LSE in lse[r] (-inf, out 0 when no key).
  template <class AccO>
  __device__ void finalize(AccO& acc_o, float (&lse)[kRows]) {
    using namespace cute;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const sum = quad_sum(row_sum[r]);
      bool const empty = sum == 0.f || row_max[r] == -INFINITY;
      float const inv = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : (row_max[r] * scale_log2 + log2f(sum)) * float(M_LN2);
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= inv;
    }
  }
};

}  // namespace flexattn
