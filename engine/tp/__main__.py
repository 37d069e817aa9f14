"""`python -m commitllm.engine.tp MODEL PROFILE [BACKEND]`: a follower rank (spawned by `--tp N`)."""

import sys

from .launch import follower_main

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m commitllm.engine.tp MODEL PROFILE [exact|triton] (with RANK, "
                 "WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)")
    sys.exit(follower_main(sys.argv[1], sys.argv[2], backend=(sys.argv[3:] or ["exact"])[0]))
