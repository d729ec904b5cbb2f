"""Ray job entrypoint for a campaign; the same code as `prisma-ray campaign`.

    ray job submit --working-dir . -- python jobs/campaign.py jobs/campaign.yaml --set output=s3://bucket/campaign

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["campaign", *sys.argv[1:]]))
