"""Ray job entrypoint for the quickstart; the same code as `prisma-ray quickstart` (and `make demo`).

    ray job submit --working-dir . -- python jobs/quickstart.py --set output=s3://bucket/quickstart

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
