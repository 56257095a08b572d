"""The aggregator: merges updates as they arrive, commits rounds, evaluates and publishes models."""
