"""`prisma-ray extract`: a dataset through a model into one Parquet activation store per hook point.

- `config`: `ExtractConfig`, the job's YAML;
- `plan`: checks and store claims before Ray starts (`plan_extract`);
- `worker`: `ExtractionWorker`, the plain class a Ray actor runs (one shard in, store shards out);
- `pipeline`: the Ray pipeline (on `runtime.pool`) and the manifests (`run_extract`).
"""
