// Host side of the SM90 forward: builds the TMA descriptors and launches `fwd_kernel`.
// Included by the generated instantiation files (instantiations/), one per (dtype, dqk, dv).
#pragma once

// Key tiles of 112 and 176 need wgmma's N = 112 / 176 shapes, which CuTe keeps behind this flag.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <algorithm>
#include <atomic>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include "flash_fwd_sm90/kernel.cuh"
#include "flash_fwd_sm90/params.h"

namespace flexattn {

namespace sm90_detail {

// (rows, dim, heads, batch), dim contiguous: the global tensors as the TMA descriptors see them.
template <class Element>
auto gmem_tensor(Element* ptr, int rows, int dim, int heads, int batch, int64_t row_stride, int64_t head_stride,
                 int64_t batch_stride) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(ptr), make_shape(rows, dim, heads, batch),
                     make_stride(row_stride, _1{}, head_stride, batch_stride));
}

constexpr int kMaxDevices = 64;  // devices whose per-instantiation launch setup is remembered

}  // namespace sm90_detail

template <class Traits>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using sm90_detail::gmem_tensor;
  using Element = typename Traits::Element;
  constexpr int kDQK = Traits::kDQK, kDV = Traits::kDV;
  bool const varlen = p.cu_seqlens_q != nullptr;
  int const batch_extent = varlen ? 1 : p.batch;
  auto const mQ = gmem_tensor(static_cast<Element const*>(p.q), p.rows_q, p.dqk, p.heads_q, batch_extent,
                               p.q_row_stride, p.q_head_stride, varlen ? 0 : p.q_batch_stride);
  auto const mK = gmem_tensor(static_cast<Element const*>(p.k), p.rows_k, p.dqk, p.heads_k, batch_extent,
                               p.k_row_stride, p.k_head_stride, varlen ? 0 : p.k_batch_stride);
  auto const mV = gmem_tensor(static_cast<Element const*>(p.v), p.rows_k, p.dv, p.heads_v, batch_extent,
                               p.v_row_stride, p.v_head_stride, varlen ? 0 : p.v_batch_stride);
  sm90::KernelParams<Traits> kp{
      p,
      make_tma_copy(SM90_TMA_LOAD{}, mQ, take<0, 2>(typename Traits::SmemLayoutQ{}), Shape<Int<Traits::kBlockM>, Int<kDQK>>{},
                    _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                    Shape<Int<Traits::kBlockN>, Int<kDQK>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(typename Traits::SmemLayoutV{}),
                    Shape<Int<Traits::kBlockN>, Int<kDV>>{}, _1{}),
      {},
      // Never 0, even for an empty grid (no launch): the host-side setup divides by the divisor.
      cutlass::FastDivmod(std::max(1, (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM)),
      cutlass::FastDivmod(std::max(1, p.heads_q)),
      cutlass::FastDivmod(std::max(1, p.heads_q / p.heads_k)),
      cutlass::FastDivmod(std::max(1, p.heads_q / p.heads_v)),
  };
  // Only the calls that store O through shared memory (kernel.cuh) encode the store's descriptor.
  if (Traits::kSmemEpilogue && !varlen) {
    auto const mO = gmem_tensor(static_cast<Element*>(p.out), p.rows_q, p.dv, p.heads_q, p.batch, p.o_row_stride,
                                p.o_head_stride, p.o_batch_stride);
    kp.tma_o = make_tma_copy(SM90_TMA_STORE{}, mO, take<0, 2>(typename Traits::SmemLayoutO{}), Shape<_64, Int<kDV>>{}, _1{});
  }
  int device = 0, num_sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (varlen && p.rows_q > 0) {  // independent of the main kernel (disjoint rows), so launched first
    sm90::fill_padding_rows<typename Traits::Element><<<std::min((p.rows_q + 3) / 4, 4 * num_sms), 128, 0, stream>>>(p);
  }
  int const num_tiles = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM * p.heads_q * p.batch;
  if (num_tiles == 0) return;
  // A persistent grid (one CTA per SM) lets the producer load the next tile while the consumers
  // finish this one (seqlen 512, hd128: 0.70x -> 0.82x cuDNN against one CTA per tile). Causal
  // tiles range from 1 to seqlen/kBlockN key blocks, and a static round-robin over them left some
  // SMs with twice the work (16k causal: 634 -> 420 TFLOP/s), so CTAs draw such tiles from a counter
  // (p.tile_counter, zeroed by the caller on this stream; null when the tiles cost the same).
  dim3 const grid(std::min(num_tiles, num_sms));
  constexpr size_t kSmemBytes = sizeof(typename Traits::SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA on SM90 is 227 KB");
  auto kernel = &sm90::fwd_kernel<Traits>;
  // The attribute stays set for the device, so it is set on an instantiation's first launch there only:
  // a launch's host time matters at short rows (seqlen 512, hd128: ~100 us a call against a 137 us kernel).
  static std::atomic<bool> smem_attribute_set[sm90_detail::kMaxDevices];
  if (device >= sm90_detail::kMaxDevices || !smem_attribute_set[device].load(std::memory_order_relaxed)) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (device < sm90_detail::kMaxDevices) smem_attribute_set[device].store(true, std::memory_order_relaxed);
  }
  kernel<<<grid, Traits::kNumThreads, kSmemBytes, stream>>>(kp);
}

// Narrow key tiles (kernel_traits.cuh) for causal/windowed calls and for rows of at most
// kShortRowKeys keys: at hd128, seqlen 512, the 128-key tiles with two Q buffers ran 459 TFLOP/s
// against 449 for the 176-key ones with one (H100, RESULTS_cuda.md, session 10). Varlen calls
// keep the wide tiles: the launch does not know their longest row.
constexpr int kShortRowKeys = 1024;

template <class Element, int kDQK, int kDV>
void run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  bool const local = p.window_left >= 0 || p.window_right >= 0;
  bool const short_rows = p.cu_seqlens_k == nullptr && p.seqlen_k <= kShortRowKeys;
  if constexpr (sm90::kNarrowHasOwnTiles<kDQK, kDV>) {
    if (local || short_rows) return launch_fwd_sm90<sm90::FwdTraits<Element, kDQK, kDV, true>>(p, stream);
  }
  launch_fwd_sm90<sm90::FwdTraits<Element, kDQK, kDV, false>>(p, stream);
}

}  // namespace flexattn
