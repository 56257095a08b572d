#!/usr/bin/env bash
# Debian packages pwff needs beyond Python: Jane Austen's novels (R data) for per-client language modelling.
set -euo pipefail
if ! dpkg -s r-cran-janeaustenr >/dev/null 2>&1; then
  echo "installing r-cran-janeaustenr" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends r-cran-janeaustenr >/dev/null
fi
