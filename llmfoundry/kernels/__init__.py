"""Custom GPU kernels (Triton), one module each; import them from their modules: this package imports nothing
eagerly so that importing it never requires triton.

- ``flash_alibi``: fused flash-attention forward and backward with the ALiBi bias computed inside the kernel.
- ``cross_entropy``: cross-entropy loss and its gradient in one pass over a chunk of logits (the training loss,
  fused with the output head in ``llmfoundry.models.mpt.loss``).
- ``lion``: the LION optimizer step in one pass over each parameter (``llmfoundry.train.lion``).
- ``gelu``: the exact (erf) GELU and its gradient, one elementwise pass each (the MPT MLP on CUDA).
"""
