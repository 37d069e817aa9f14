"""`python -m commitllm.engine.tp MODEL PROFILE`: a follower rank (spawned by `--tp N`)."""

import sys

from .launch import follower_main

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m commitllm.engine.tp MODEL PROFILE (with RANK, WORLD_SIZE, "
                 "MASTER_ADDR, MASTER_PORT set)")
    sys.exit(follower_main(sys.argv[1], sys.argv[2]))
