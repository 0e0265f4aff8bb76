"""Evaluation: decision metrics (balanced accuracy, missed and false interruptions, reply
similarity), the shipped benchmark and its cases, what an evaluation records on an MLflow run, and
the promotion of a new version to the `champion` alias only on comparable scores."""
