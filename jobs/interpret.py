"""Ray job entrypoint for feature dashboards; the same code as `prisma-ray dashboard`.

    ray job submit --working-dir . -- python jobs/interpret.py s3://bucket/runs/sae/topk-k-32 \
        --data dataset.yaml --output s3://bucket/dashboards/topk-k-32

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
Submitting it again reuses the top-activation results already written and re-renders the site.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["dashboard", *sys.argv[1:]]))
