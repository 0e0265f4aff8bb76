"""Operations: MLflow tracking (the store, experiments, runs, datasets as inputs, the model
registry) and the local stack (a Prefect server, an MLflow server, the GPU work pool and its
workers)."""
