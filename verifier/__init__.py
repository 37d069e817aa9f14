"""commitllm.verifier"""
