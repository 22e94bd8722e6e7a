// Arguments of the SM90 forward kernel and the registry of its compiled instantiations.
//
// This header is plain C++ (no torch, no CuTe) so the binding (csrc/flexattn_cuda.cpp) and the
// instantiation files share it without compiling each other's headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace flexattn {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Strides are in elements. Dense tensors are (batch, seqlen, heads, dim); varlen tensors are
// (total, heads, dim) with batch_stride 0, each sequence starting at cu_seqlens[b].
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // dense (batch, heads_q, seqlen_q); varlen (heads_q, total_q)

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch, heads_q, heads_k, heads_v;
  int seqlen_q, seqlen_k;  // dense lengths; varlen: seqlen_q is max_seqlen_q (it sizes the grid)
  int rows_q, rows_k;      // rows of the q/out and k/v tensors (the TMA extents)
  int dqk, dv;             // actual head dims; the kernel's tile dims may be larger (TMA zero-fills)

  const int* cu_seqlens_q;  // (batch + 1) or null (dense)
  const int* cu_seqlens_k;
  const int* seqused_k;  // (batch) or null: keys used per sequence

  float softmax_scale;
  float softcap;  // 0 = off
  int window_left, window_right;  // -1 = unbounded; causal is window_right = 0

  // One int of zeroed device workspace the persistent CTAs draw their tiles from, or null when every
  // tile costs the same (no mask, no varlen): then each CTA takes every gridDim.x-th tile.
  int* tile_counter;
};

using FwdLauncher = void (*)(const FwdParams&, cudaStream_t);

struct FwdKernelKey {
  DType dtype;
  int dqk;
  int dv;
};

// Each generated instantiation file registers its launcher at load time (registry in the binding).
bool register_fwd_sm90(FwdKernelKey key, FwdLauncher launcher);

// Defined in flash_fwd_sm90/launch.cuh; explicitly instantiated per (dtype, dqk, dv).
template <class Element, int kDQK, int kDV>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

}  // namespace flexattn
