"""The three pwff services, and what composes them (the CLI and the embedded runner)."""
