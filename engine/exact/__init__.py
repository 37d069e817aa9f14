"""The exact engine's torch CPU backend: the numerics spec (verifier/numerics) written for speed."""
