"""`prisma-ray train`: sparse dictionaries on activation stores, data-parallel on Ray Train.

- `config`: `TrainConfig`, the job's YAML;
- `data`: planning and reading the training rows from the stores (no Ray);
- `job`: the Ray Train job (`run_training`) and its per-worker loop.
"""
