// Which (query block, head, batch) each step of a persistent CTA computes.
//
// Tiles are numbered query block fastest, so CTAs running at the same time mostly share one
// head's K and V (L2 reuse). Causal and windowed grids take the query blocks that see the most
// keys (the last ones) first, so the long tiles do not all land in the final wave.
#pragma once

namespace flexattn {

struct TileCoord {
  int m_block, head, batch;
};

struct TileScheduler {
  int num_m_blocks, heads, batch;
  bool longest_first;

  __device__ int num_tiles() const { return num_m_blocks * heads * batch; }

  __device__ TileCoord tile(int index) const {
    int const m = index % num_m_blocks;
    int const head_batch = index / num_m_blocks;
    return {longest_first ? num_m_blocks - 1 - m : m, head_batch % heads, head_batch / heads};
  }
};

}  // namespace flexattn
