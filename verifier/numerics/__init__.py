"""The canonical numerics spec (numpy): every committed value of the exact engine is defined here.

docs/NUMERICS.md describes the same computations in prose; the torch backend and the Triton
kernels must equal these functions bit for bit.
"""

from .profiles import PROFILES, SPEC_VERSION, Profile, get_profile

__all__ = ["PROFILES", "SPEC_VERSION", "Profile", "get_profile"]
