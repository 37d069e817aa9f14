"""commitllm.engine"""
