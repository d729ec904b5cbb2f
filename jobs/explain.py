"""Ray job entrypoint for auto-interpretation; the same code as `prisma-ray explain`.

    ray job submit --working-dir . -- python jobs/explain.py CONFIG.yaml --set evidence=s3://bucket/topk

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
