// The binding the `cuda` backend calls (flexattn_ops/cuda_backend.py): torch ops in the
// `flexattn_cuda` namespace that check their inputs, fill FwdParams and run the SM90 kernel.
//
// The kernels register themselves (one generated file per (dtype, dqk, dv), see
// flexattn_ops/cuda_build.py); a call runs the smallest registered instantiation whose head dims
// cover the inputs' (TMA zero-fills the padding columns).
#include <Python.h>

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "flash_fwd_sm90/params.h"

namespace flexattn {

namespace {

struct Registered {
  FwdKernelKey key;
  FwdLauncher launcher;
};

std::vector<Registered>& fwd_sm90_registry() {
  static std::vector<Registered> registry;  // filled by static initialisers of the instantiation files
  return registry;
}

const char* dtype_name(DType d) { return d == DType::kBFloat16 ? "bf16" : "fp16"; }

const Registered* find_fwd_sm90(DType dtype, int dqk, int dv) {
  const Registered* best = nullptr;
  for (const Registered& r : fwd_sm90_registry()) {
    if (r.key.dtype != dtype || r.key.dqk < dqk || r.key.dv < dv) continue;
    if (best == nullptr || r.key.dqk + r.key.dv < best->key.dqk + best->key.dv) best = &r;
  }
  return best;
}

void check_operand(const at::Tensor& t, const char* name, int rank) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
  // TMA needs 16-byte aligned base addresses and strides.
  for (int d = 0; d < rank - 1; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, name, " stride ", d, " must be a multiple of 8 elements");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& softmax_lse, const std::optional<at::Tensor>& cu_seqlens_q,
              const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
              int64_t max_seqlen_q, double softmax_scale, int64_t window_left, int64_t window_right,
              double softcap) {
  bool const varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k go together");
  int const rank = varlen ? 3 : 4;
  check_operand(q, "q", rank);
  check_operand(k, "k", rank);
  check_operand(v, "v", rank);
  check_operand(out, "out", rank);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "q must be bf16 or fp16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "q, k, v and out must share a dtype");
  TORCH_CHECK(softmax_lse.scalar_type() == at::kFloat && softmax_lse.is_contiguous(),
              "softmax_lse must be a contiguous float32 tensor");
  c10::cuda::CUDAGuard guard(q.device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major == 9 && minor == 0, "the SM90 kernel needs an SM 9.0 GPU, got ", major, ".", minor);

  int const dqk = q.size(-1), dv = v.size(-1);
  TORCH_CHECK(dqk % 8 == 0 && dv % 8 == 0, "head dims must be multiples of 8, got dqk=", dqk, ", dv=", dv);
  DType const dtype = q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
  const Registered* kernel = find_fwd_sm90(dtype, dqk, dv);
  TORCH_CHECK(kernel != nullptr, "no compiled SM90 kernel covers ", dtype_name(dtype), " dqk=", dqk, ", dv=", dv);

  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = softmax_lse.data_ptr<float>();
  int const r = varlen ? 0 : 1;  // index of the row axis
  // A size-1 axis may carry any stride (check_operand allows it), but TMA wants 16-byte multiples:
  // its only coordinate is 0, so stride 0 describes it exactly.
  auto stride = [](const at::Tensor& t, int d) -> int64_t { return t.size(d) == 1 ? 0 : t.stride(d); };
  auto batch_stride = [&](const at::Tensor& t) -> int64_t { return varlen ? 0 : stride(t, 0); };
  p.q_batch_stride = batch_stride(q), p.q_row_stride = stride(q, r), p.q_head_stride = stride(q, r + 1);
  p.k_batch_stride = batch_stride(k), p.k_row_stride = stride(k, r), p.k_head_stride = stride(k, r + 1);
  p.v_batch_stride = batch_stride(v), p.v_row_stride = stride(v, r), p.v_head_stride = stride(v, r + 1);
  p.o_batch_stride = batch_stride(out), p.o_row_stride = stride(out, r), p.o_head_stride = stride(out, r + 1);
  p.lse_batch_stride = varlen ? 0 : softmax_lse.stride(0);
  p.lse_head_stride = varlen ? softmax_lse.stride(0) : softmax_lse.stride(1);
  p.batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = dv;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out must have q's shape with v's head dim, got ", out.sizes());
  std::vector<int64_t> lse_shape = varlen ? std::vector<int64_t>{q.size(1), q.size(0)}
                                          : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(softmax_lse.sizes() == at::IntArrayRef(lse_shape), "softmax_lse must be ", at::IntArrayRef(lse_shape),
              ", got ", softmax_lse.sizes());
  for (const at::Tensor* t : {&k, &v, &out, &softmax_lse}) {
    TORCH_CHECK(t->device() == q.device(), "every tensor must be on q's device");
  }
  if (varlen) {
    TORCH_CHECK(cu_seqlens_k->numel() == cu_seqlens_q->numel(), "cu_seqlens_q and cu_seqlens_k must have batch + 1 entries");
  } else {
    TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch && k.size(1) == v.size(1), "q, k, v batch / k, v lengths differ");
  }
  if (seqused_k.has_value()) TORCH_CHECK(seqused_k->numel() == p.batch, "seqused_k must have one entry a sequence");
  p.heads_q = q.size(r + 1), p.heads_k = k.size(r + 1), p.heads_v = v.size(r + 1);
  TORCH_CHECK(p.heads_q % p.heads_k == 0 && p.heads_q % p.heads_v == 0, "heads_q must be a multiple of heads_k and heads_v");
  p.rows_q = q.size(r), p.rows_k = k.size(r);
  p.seqlen_q = varlen ? int(max_seqlen_q) : q.size(1);
  p.seqlen_k = varlen ? 0 : k.size(1);
  p.dqk = dqk, p.dv = dv;
  auto int_ptr = [&q](const std::optional<at::Tensor>& t, const char* name) -> const int* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == q.device(), name,
                " must be a contiguous int32 tensor on q's device");
    return t->data_ptr<int>();
  };
  p.cu_seqlens_q = int_ptr(cu_seqlens_q, "cu_seqlens_q");
  p.cu_seqlens_k = int_ptr(cu_seqlens_k, "cu_seqlens_k");
  p.seqused_k = int_ptr(seqused_k, "seqused_k");
  p.softmax_scale = float(softmax_scale);
  p.softcap = float(softcap);
  TORCH_CHECK(softmax_scale > 0 || softcap > 0, "the SM90 kernel needs softmax_scale > 0 (it takes row maxima of raw scores)");
  // A window side wider than every row-to-key distance is unbounded; saying so keeps the kernel's
  // int arithmetic (diagonal + window) from overflowing.
  auto window = [&](int64_t w) -> int { return w < 0 || w >= int64_t(p.rows_q) + p.rows_k ? -1 : int(w); };
  p.window_left = window(window_left), p.window_right = window(window_right);

  // Tiles of unequal cost (a causal/window mask, varlen, seqused_k) balance over the persistent CTAs
  // through a tile counter: stream-ordered workspace from the caching allocator, zeroed on the stream
  // (a memset node under CUDA-graph capture). Tiles of equal cost need none, so their launch has no
  // memset before it (its share of the session-10 gains was not measured apart).
  cudaStream_t const stream = c10::cuda::getCurrentCUDAStream().stream();
  bool const unequal_tiles = p.window_left >= 0 || p.window_right >= 0 || varlen || p.seqused_k != nullptr;
  at::Tensor tile_counter;
  p.tile_counter = nullptr;
  if (unequal_tiles) {
    tile_counter = at::empty({1}, q.options().dtype(at::kInt));
    p.tile_counter = tile_counter.data_ptr<int>();
    C10_CUDA_CHECK(cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream));
  }
  kernel->launcher(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<std::string> fwd_sm90_kernels() {
  std::vector<std::string> names;
  for (const Registered& r : fwd_sm90_registry()) {
    names.push_back(std::string(dtype_name(r.key.dtype)) + "_" + std::to_string(r.key.dqk) + "x" + std::to_string(r.key.dv));
  }
  return names;
}

}  // namespace

bool register_fwd_sm90(FwdKernelKey key, FwdLauncher launcher) {
  fwd_sm90_registry().push_back({key, launcher});
  return true;
}

}  // namespace flexattn

TORCH_LIBRARY(flexattn_cuda, m) {
  m.def(
      "fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) softmax_lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, float softmax_scale, int window_left, "
      "int window_right, float softcap) -> ()");
  m.def("fwd_sm90_kernels() -> str[]", &flexattn::fwd_sm90_kernels);
}

TORCH_LIBRARY_IMPL(flexattn_cuda, CUDA, m) { m.impl("fwd_sm90", &flexattn::fwd_sm90); }

// The install build imports this library as the Python module flexattn_ops._C (the ops register
// at load time; the module itself is empty). The JIT build loads it with torch.ops.load_library.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
