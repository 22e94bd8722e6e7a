// Which (query block, head, batch) each step of a persistent CTA computes.
//
// Tiles are numbered query block fastest, so CTAs running at the same time mostly share one
// head's K and V (L2 reuse). Causal and windowed grids take the query blocks that see the most
// keys (the last ones) first. CTA i starts with tile i; each later tile goes to whichever CTA asks
// first (an atomic counter), so costlier tiles (causal, windowed, varlen) balance over the SMs.
#pragma once

namespace flexattn {

struct TileCoord {
  int m_block, head, batch;
};

struct TileScheduler {
  int num_m_blocks, heads, batch;
  bool longest_first;

  __device__ int num_tiles() const { return num_m_blocks * heads * batch; }

  // The tile after this CTA's current one: gridDim.x plus how many CTAs asked before.
  __device__ int next(int* counter) const { return int(gridDim.x) + atomicAdd(counter, 1); }

  __device__ TileCoord tile(int index) const {
    int const m = index % num_m_blocks;
    int const head_batch = index / num_m_blocks;
    return {longest_first ? num_m_blocks - 1 - m : m, head_batch % heads, head_batch / heads};
  }
};

// A position in the 2-slot ring through which the producer hands tile indices to the consumers:
// uses so far; the slot alternates and its barriers' phase flips every second use. (One counter
// rather than slot and phase: the consumers' loop is one register short of spilling.)
struct RingPos {
  int uses = 0;
  __device__ int slot() const { return uses & 1; }
  __device__ int phase() const { return (uses >> 1) & 1; }
  __device__ void advance() { ++uses; }
};

}  // namespace flexattn
