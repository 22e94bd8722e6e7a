"""flexattn_ops: FlashAttention for the PyTorch 2 compiler stack.

Importing the package registers `torch.ops.flexattn.*`. The public API mirrors flash-attn 2.8.
"""

from flexattn_ops import ops  # noqa: F401  (registers torch.ops.flexattn.*)
from flexattn_ops.dispatch import BackendChoice
from flexattn_ops.interface import (
    explain_backend,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__version__ = "0.1.0"

__all__ = [
    "BackendChoice",
    "explain_backend",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
