"""commitllm.keys"""
