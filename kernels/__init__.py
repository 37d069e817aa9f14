"""commitllm.kernels: the exact Triton kernels (docs/KERNELS.md).

Submodules are not imported here: TRITON_INTERPRET (the CPU interpreter) is read when a kernel is
decorated, so callers choose it before importing a kernel module.
"""
