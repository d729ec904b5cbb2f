"""Ray job entrypoint for dictionary training; the same code as `prisma-ray train`.

    ray job submit --working-dir . -- python jobs/train_sae.py CONFIG.yaml --set runs=s3://bucket/runs

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
Submitting again with the same `name` and `runs` resumes from the latest checkpoint.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
