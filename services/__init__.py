"""The three pwff services, and what composes them (the CLI and the embedded runner)."""

import os as _os

# Models and data load from installed packages only. huggingface_hub reads this when it is
# first imported, so it has to be set before anything imports transformers or peft.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
