// Per-sequence lengths and row offsets, for dense and varlen batches alike.
#pragma once

#include "flash_fwd_sm90/params.h"

namespace flexattn {

struct SeqInfo {
  int seqlen_q;  // query rows of this sequence
  int seqlen_k;  // keys of this sequence (seqused_k where given)
  int row0_q;    // first row of this sequence in the q/out tensors (0 when dense)
  int row0_k;    // first row in the k/v tensors
  int batch_coord;  // batch index into the tensors (0 when varlen: the batch axis is folded into rows)

  __device__ SeqInfo(const FwdParams& p, int b) {
    bool const varlen = p.cu_seqlens_q != nullptr;
    row0_q = varlen ? p.cu_seqlens_q[b] : 0;
    row0_k = varlen ? p.cu_seqlens_k[b] : 0;
    seqlen_q = varlen ? p.cu_seqlens_q[b + 1] - row0_q : p.seqlen_q;
    seqlen_k = p.seqused_k != nullptr ? p.seqused_k[b] : (varlen ? p.cu_seqlens_k[b + 1] - row0_k : p.seqlen_k);
    batch_coord = varlen ? 0 : b;
  }
};

}  // namespace flexattn
