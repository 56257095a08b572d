"""The scheduler: the HTTP API, job state, the round loop and the compute budget of every task."""
