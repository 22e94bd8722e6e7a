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

// Uses of a ring of kSlots shared-memory buffers, each with its own full/empty barriers: the slot of
// the current use and the phase of that slot's barriers (it flips every kSlots uses). One counter
// rather than slot and phase: the producer thread runs on 24 - 32 registers.
template <int kSlots>
struct SlotCounter {
  int uses = 0;
  __device__ int slot() const { return uses % kSlots; }
  __device__ int phase() const { return (uses / kSlots) & 1; }
  __device__ void advance() { ++uses; }
};

// The 2-slot ring through which the producer hands tile indices to the consumers.
using RingPos = SlotCounter<2>;

}  // namespace flexattn
