"""The worker: takes one task at a time, trains one client for one round, uploads the update."""
