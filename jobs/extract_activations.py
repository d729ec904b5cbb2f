"""Ray job entrypoint for activation extraction; the same code as `prisma-ray extract`.

    ray job submit --working-dir . -- python jobs/extract_activations.py CONFIG.yaml --set output=s3://bucket/acts
    # on GPU workers, the model in bfloat16 (one GPU per actor; recorded in each store):
    ... --set resources.device=cuda --set model_dtype=bfloat16

Inside a Ray job (`$RAY_ADDRESS` set) it runs on that cluster; elsewhere it starts a local Ray.
"""

import sys

from prisma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
