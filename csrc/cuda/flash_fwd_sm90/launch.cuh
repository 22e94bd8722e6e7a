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

// Narrow tiles (kernel_traits.cuh): causal/windowed rows of at most kShortRowKeys keys take them, and
// as each tile class's flags say, dense rows that short and masked rows longer. At hd128, seqlen 512,
// the 128-key tiles with two Q buffers ran 459 TFLOP/s against 449 for the 176-key ones with one
// (H100, RESULTS_cuda.md, session 10). Varlen rows count as long: the launch does not know the
// longest one. Short dense rows on an uneven grid also start some CTAs late (late_start_ns).
constexpr int kShortRowKeys = 1024;

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

// The kernel's parameters: the TMA descriptors (K and V multicast ones for clusters) and the divisors.
template <class Traits>
sm90::KernelParams<Traits> kernel_params(const FwdParams& p, int late_start_ns) {
  using namespace cute;
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
      make_tma_copy(typename Traits::TmaLoadKV{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                    Shape<Int<Traits::kBlockN>, Int<kDQK>>{}, Int<Traits::kClusterM>{}),
      make_tma_copy(typename Traits::TmaLoadKV{}, mV, take<0, 2>(typename Traits::SmemLayoutV{}),
                    Shape<Int<Traits::kBlockN>, Int<kDV>>{}, Int<Traits::kClusterM>{}),
      {},
      // Never 0, even for an empty grid (no launch): the host-side setup divides by the divisor.
      cutlass::FastDivmod(std::max(1, (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM)),
      cutlass::FastDivmod(std::max(1, p.heads_q)),
      cutlass::FastDivmod(std::max(1, p.heads_q / p.heads_k)),
      cutlass::FastDivmod(std::max(1, p.heads_q / p.heads_v)),
      late_start_ns,
  };
  // Only the calls that store O through shared memory (kernel.cuh) encode the store's descriptor.
  if (Traits::kSmemEpilogue && !varlen) {
    auto const mO = gmem_tensor(static_cast<Element*>(p.out), p.rows_q, p.dv, p.heads_q, p.batch, p.o_row_stride,
                                p.o_head_stride, p.o_batch_stride);
    kp.tma_o = make_tma_copy(SM90_TMA_STORE{}, mO, take<0, 2>(typename Traits::SmemLayoutO{}), Shape<_64, Int<kDV>>{}, _1{});
  }
  return kp;
}

// Tiles of equal cost on a static schedule (no tile counter) keep every CTA in step: all of them load
// their next tile's Q and first K/V blocks (from DRAM at short rows) and store its O at the same
// moment, tile after tile. Where the tiles do not divide evenly over the grid, the CTAs with one tile
// fewer have a tile's time to spare, so they start a third of a tile late and the two groups' tile
// boundaries stop coinciding. H100, seqlen 512, batch 32, ours / cuDNN by the delay (3 rounds each,
// RESULTS_cuda.md session 16): hd128 (15.5 waves, tiles ~8.8 us) 0.975 - 0.979 without, 1.005 / 1.014 /
// 1.000 / 0.992 at 2 / 3.5 / 5 / 7 us; hd256 (7.8 waves, ~17.7 us) 0.997 - 1.005 without, 1.003 / 1.007 /
// 1.027 / 1.024; hd64 (23.3 waves, ~6.6 us) 1.015 - 1.021 without, 1.035 / 1.028 / 1.023 / 1.008.
// A tile's time is estimated from its FLOPs at 3800 per ns per SM (~500 TFLOP/s on 132 SMs, the H100's
// seqlen-512 rate); a third of it sits in the range that won for all three. Only dense rows of at most
// kShortRowKeys keys start late, on the kernels that run them (FwdTraits::kRunsShortDenseRows): at 16k,
// hd128 and hd256 late moved within noise.

template <class Traits>
int late_start_ns(const FwdParams& p, int num_tiles, int grid) {
  if (!Traits::kRunsShortDenseRows || p.tile_counter != nullptr || p.seqlen_k > kShortRowKeys || grid == 0 ||
      num_tiles % grid == 0) {
    return 0;
  }
  int64_t const keys = int64_t(p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN * Traits::kBlockN;
  int64_t const tile_flops = 2 * int64_t(Traits::kBlockM) * keys * (Traits::kDQK + Traits::kDV);
  constexpr int64_t kFlopsPerNsPerSm = 3800;
  return int(std::min<int64_t>(tile_flops / kFlopsPerNsPerSm / 3, 1 << 30));
}

// The kernel's shared-memory attribute, set on an instantiation's first launch on a device only (it
// stays set): a launch's host time matters at short rows (seqlen 512, hd128: ~100 us a call against a
// 137 us kernel). What the per-call attribute cost was not measured apart.
template <class Traits>
void set_smem_attribute_once(int device) {
  static std::atomic<bool> done[kMaxDevices];
  if (device < kMaxDevices && done[device].load(std::memory_order_relaxed)) return;
  cudaFuncSetAttribute(&sm90::fwd_kernel<Traits>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       int(sizeof(typename Traits::SharedStorage)));
  if (device < kMaxDevices) done[device].store(true, std::memory_order_relaxed);
}

// How many 2-CTA clusters of this instantiation the device runs at once (a GPC with an odd number
// of free SMs leaves one out), queried once per device; 0 where the query fails (its error cleared,
// so that the plain launch the caller falls back to is not reported as failing).
template <class Traits>
int max_active_clusters(int device, cudaLaunchConfig_t config) {
  static std::atomic<int> known[kMaxDevices];  // the count + 1; 0: not asked yet
  if (device < kMaxDevices && known[device].load(std::memory_order_relaxed) > 0) return known[device] - 1;
  config.gridDim = dim3(Traits::kClusterM);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, &sm90::fwd_kernel<Traits>, &config) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;
  }
  if (device < kMaxDevices) known[device].store(clusters + 1, std::memory_order_relaxed);
  return clusters;
}

}  // namespace sm90_detail

// Launches `fwd_kernel` on a persistent grid. A persistent grid (one CTA per SM) lets the producer
// load the next tile while the consumers finish this one (seqlen 512, hd128: 0.70x -> 0.82x cuDNN
// against one CTA per tile). Causal tiles range from 1 to seqlen/kBlockN key blocks, and a static
// round-robin over them left some SMs with twice the work (16k causal: 634 -> 420 TFLOP/s), so CTAs
// draw such tiles from a counter (p.tile_counter, zeroed by the caller on this stream; null when the
// tiles cost the same).
//
// Cluster traits (kClusterM = 2; kernel_traits.cuh) launch 2-CTA clusters: min(tiles, SMs) CTAs rounded
// down to even and capped at two per co-resident cluster. The caller guarantees what the kernel's
// static pairing needs (run_fwd_sm90). Returns false, having launched nothing, where the device runs no
// such cluster.
template <class Traits>
bool launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  constexpr bool kCluster = Traits::kClusterM > 1;
  constexpr int kSmemBytes = int(sizeof(typename Traits::SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA on SM90 is 227 KB");
  bool const varlen = p.cu_seqlens_q != nullptr;
  int device = 0, num_sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  int const num_tiles = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM * p.heads_q * p.batch;
  auto kernel = &sm90::fwd_kernel<Traits>;
  if constexpr (kCluster) {
    if (num_tiles < 2 * num_sms) return false;  // run_fwd_sm90 says why
    sm90_detail::set_smem_attribute_once<Traits>(device);  // before the occupancy query, which depends on it
    cudaLaunchAttribute cluster_dim;
    cluster_dim.id = cudaLaunchAttributeClusterDimension;
    cluster_dim.val.clusterDim.x = Traits::kClusterM;
    cluster_dim.val.clusterDim.y = 1;
    cluster_dim.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.blockDim = dim3(Traits::kNumThreads);
    config.dynamicSmemBytes = kSmemBytes;
    config.stream = stream;
    config.attrs = &cluster_dim;
    config.numAttrs = 1;
    int const max_ctas = Traits::kClusterM * sm90_detail::max_active_clusters<Traits>(device, config);
    int const ctas = std::min({num_tiles, num_sms, max_ctas}) / Traits::kClusterM * Traits::kClusterM;
    if (ctas == 0) return false;
    config.gridDim = dim3(ctas);
    // An error (as of a <<<>>> launch) stays the last one, which the binding checks after the launcher.
    cudaLaunchKernelEx(&config, kernel, sm90_detail::kernel_params<Traits>(p, sm90_detail::late_start_ns<Traits>(p, num_tiles, ctas)));
  } else {
    if (varlen && p.rows_q > 0) {  // independent of the main kernel (disjoint rows), so launched first
      sm90::fill_padding_rows<typename Traits::Element><<<std::min((p.rows_q + 3) / 4, 4 * num_sms), 128, 0, stream>>>(p);
    }
    if (num_tiles == 0) return true;
    sm90_detail::set_smem_attribute_once<Traits>(device);
    int const grid = std::min(num_tiles, num_sms);
    kernel<<<grid, Traits::kNumThreads, kSmemBytes, stream>>>(
        sm90_detail::kernel_params<Traits>(p, sm90_detail::late_start_ns<Traits>(p, num_tiles, grid)));
  }
  return true;
}

template <class Element, int kDQK, int kDV>
void run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  bool const local = p.window_left >= 0 || p.window_right >= 0;
  bool const short_rows = p.cu_seqlens_k == nullptr && p.seqlen_k <= kShortRowKeys;
  // hd128 rows of more than kShortRowKeys keys whose tiles all cost the same run on 2-CTA clusters
  // that share K and V (kernel.cuh): hd128 16k 649 - 668 -> 672 - 691 TFLOP/s and 8k +3 % on the H100,
  // where L2 serves nearly every K/V load; at 512 - 4096 keys it moved -2 to +2 % (RESULTS_cuda.md,
  // session 13), so short rows keep the plain kernel. Their static schedule pairs query blocks 2i,
  // 2i + 1 of one head, so it needs an even number of query blocks a head, and both tiles of a pair
  // must read the same key blocks: no varlen, no seqused_k, no window (causal included). Grids of
  // fewer than two tiles per SM keep the plain kernel too (a choice, not measured: there the CTAs
  // finish after one or two tiles, and K/V traffic is not what bounds them).
  if constexpr (kDQK == 128 && kDV == 128) {
    using Pair = sm90::FwdTraits<Element, kDQK, kDV, /*kNarrow=*/false, /*kClusterM=*/2>;
    int const m_blocks = (p.seqlen_q + Pair::kBlockM - 1) / Pair::kBlockM;
    if (!short_rows && p.tile_counter == nullptr && p.cu_seqlens_q == nullptr && !local && p.seqused_k == nullptr &&
        m_blocks % 2 == 0 && launch_fwd_sm90<Pair>(p, stream)) {
      return;
    }
  }
  if constexpr (sm90::kNarrowHasOwnTiles<kDQK, kDV>) {
    if (sm90::TileConfig<kDQK, kDV, true>::takes_narrow(short_rows, local)) {
      launch_fwd_sm90<sm90::FwdTraits<Element, kDQK, kDV, true>>(p, stream);
      return;
    }
  }
  launch_fwd_sm90<sm90::FwdTraits<Element, kDQK, kDV, false>>(p, stream);
}

}  // namespace flexattn
