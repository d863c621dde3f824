"""Built-in loggers: where a run's records go (log.jsonl, a CSV table, TensorBoard)."""
