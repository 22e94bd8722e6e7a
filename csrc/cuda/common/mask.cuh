// Causal / sliding-window / key-length masking (SPEC section 4, bottom-right aligned).
//
// Query row i sees key j iff j < seqlen_k and i + off - window_left <= j <= i + off + window_right,
// off = seqlen_k - seqlen_q, a window side of -1 being unbounded. Tiles wholly outside are never
// loaded (`n_block_range`); only tiles that straddle an edge pay for the per-element test.
#pragma once

#include <cute/tensor.hpp>

namespace flexattn {

template <int kBlockM, int kBlockN>
struct Mask {
  int seqlen_q, seqlen_k, window_left, window_right;

  __device__ int offset() const { return seqlen_k - seqlen_q; }

  // [n_min, n_max) key blocks that query block m_block can see; empty when n_max <= n_min.
  __device__ cute::tuple<int, int> n_block_range(int m_block) const {
    int n_max = (seqlen_k + kBlockN - 1) / kBlockN;
    int const last_row = min((m_block + 1) * kBlockM, seqlen_q) - 1;
    if (window_right >= 0) {
      int const keys = last_row + offset() + window_right + 1;  // keys the last row may see
      n_max = min(n_max, keys <= 0 ? 0 : (keys + kBlockN - 1) / kBlockN);
    }
    int n_min = 0;
    if (window_left >= 0) {
      int const first_key = m_block * kBlockM + offset() - window_left;
      n_min = first_key <= 0 ? 0 : first_key / kBlockN;
    }
    return cute::make_tuple(n_min, n_max);
  }

  // Whether key block n_block has any masked element for query block m_block (uniform per CTA).
  __device__ bool needs_mask(int m_block, int n_block) const {
    int const col_end = (n_block + 1) * kBlockN;  // one past the tile's last key
    if (col_end > seqlen_k) return true;
    if (window_right >= 0 && col_end - 1 > m_block * kBlockM + offset() + window_right) return true;
    if (window_left >= 0 && n_block * kBlockN < (m_block + 1) * kBlockM - 1 + offset() - window_left) return true;
    return false;
  }

  // scores: (rows, cols) view of one thread's accumulator; coords: the same view of the tile's
  // identity tensor, giving each element's (row, col) inside the tile.
  template <class Scores, class Coords>
  __device__ void apply(Scores& scores, Coords const& coords, int m_block, int n_block) const {
    using namespace cute;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      int const row = m_block * kBlockM + get<0>(coords(r, 0));
      int const diag = row + offset();
      int const col_hi = window_right >= 0 ? min(seqlen_k - 1, diag + window_right) : seqlen_k - 1;
      int const col_lo = window_left >= 0 ? diag - window_left : 0;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        int const col = n_block * kBlockN + get<1>(coords(r, c));
        if (col > col_hi || col < col_lo) scores(r, c) = -INFINITY;
      }
    }
  }
};

}  // namespace flexattn
