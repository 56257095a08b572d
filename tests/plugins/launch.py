"""`python -m tests.plugins.launch services.worker`: a service, unchanged, with the test modes registered.

The registry is per process: a mode a test registers in its own process (as tests/test_modes.py does
for `head-sgd`) is unknown to the service processes it starts. This launcher adds the test plugins'
registry lines and then runs the named service module as `__main__`, exactly as `python -m` would.
"""

from __future__ import annotations

import runpy
import sys

from shared.registry import MODES

TEST_MODES = {
    "head-sgd": "tests.plugins.head_sgd:HeadSGDMode",
    "synthetic": "tests.plugins.synthetic:SyntheticMode",
}


def register() -> None:
    # The same registry line a plugin would add to shared/registry.py, made at run time.
    MODES._entries.update(TEST_MODES)


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].startswith("services."):
        sys.exit("usage: python -m tests.plugins.launch services.<name> [args...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    register()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
