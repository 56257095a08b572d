"""pwff's common library: specs, messages, codecs, bus and store, models and data.

Nothing here imports from `services`: the services meet only on the bus and in the store.
"""

import os as _os

# Models and data load from installed packages only. huggingface_hub reads this when it is
# first imported, so it has to be set before anything imports transformers or peft.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
