"""Plugins defined only for tests: proof that a mode, a preset or a strategy is one class and one line."""
