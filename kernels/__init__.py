"""commitllm.kernels"""
