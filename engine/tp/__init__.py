"""Tensor parallelism over torch.distributed with bit-identical results at every degree (docs/TP.md)."""
