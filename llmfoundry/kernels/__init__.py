"""Custom GPU kernels (Triton).

`llmfoundry.kernels.flash_alibi.flash_alibi_attention` is a fused flash-attention forward and backward with
the ALiBi bias computed inside the kernel. Import it from its module: this package imports nothing eagerly so
that importing it never requires triton.
"""
