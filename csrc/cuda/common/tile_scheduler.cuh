// Which (query block, head, batch) each step of a persistent CTA computes.
//
// Tiles are numbered query block fastest, so CTAs running at the same time mostly share one
// head's K and V (L2 reuse). Causal and windowed grids take the query blocks that see the most
// keys (the last ones) first. CTA i starts with tile i. When tiles differ in cost (causal, windowed,
// varlen) each later tile goes to whichever CTA asks first (an atomic counter), so they balance over
// the SMs; when all cost the same, CTA i takes every gridDim.x-th tile, which needs no counter and so
// no memset before the launch. That static walk also serves the SM90 kernel's 2-CTA clusters
// (kernel.cuh): with an even grid and an even number of query blocks per head, CTAs 2c and 2c + 1
// take tiles 2P and 2P + 1 at every step, the two halves of one (head, batch)'s query-block pair.
#pragma once

#include <cutlass/fast_math.h>

namespace flexattn {

struct TileCoord {
  int m_block, head, batch;
};

// The divisions by the query-block and head counts use precomputed multipliers (cutlass::FastDivmod,
// built on the host). A division by a runtime value is an instruction sequence around a MUFU.RCP (the
// unit the consumers' exp2 keep busy), run by the producer thread before a tile's first loads: at
// seqlen 512, hd128 the producer's index-to-first-K time fell 1918 -> 1085 cycles without them.
struct TileScheduler {
  cutlass::FastDivmod m_blocks, heads;
  int batch;
  bool longest_first;

  __device__ int num_tiles() const { return m_blocks.divisor * heads.divisor * batch; }

  // This CTA's tile number `step` (its first is 0) for step > 0: with a counter, gridDim.x plus how
  // many CTAs asked before; without one (tiles of equal cost), blockIdx.x + step * gridDim.x. (The
  // step, not the previous index: the caller counts steps anyway, and the producer thread that calls
  // this is short of registers.)
  __device__ int next(int* counter, int step) const {
    return counter != nullptr ? int(gridDim.x) + atomicAdd(counter, 1) : int(blockIdx.x) + step * int(gridDim.x);
  }

  __device__ TileCoord tile(int index) const {
    int head_batch, m, batch_index, head;
    m_blocks(head_batch, m, index);
    heads(batch_index, head, head_batch);
    return {longest_first ? m_blocks.divisor - 1 - m : m, head, batch_index};
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
