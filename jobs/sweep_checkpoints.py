"""Ray job entrypoint for the checkpoint sweep; the same code as `prisma-ray sweep`.

    ray job submit --working-dir . -- python jobs/sweep_checkpoints.py jobs/sweep_checkpoints.yaml \
        --set output=s3://bucket/sweeps/run1

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
Submitting it again resumes: checkpoints already evaluated are skipped.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
