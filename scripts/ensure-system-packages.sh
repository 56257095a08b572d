#!/usr/bin/env bash
# Debian packages pwff needs beyond Python: Jane Austen's novels (R data) for per-client language modelling;
# Prometheus (prometheus + promtool) for the live-scrape dashboard test and the alert-rule checks.
set -euo pipefail
missing=()
for pkg in r-cran-janeaustenr prometheus; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  # --no-install-recommends keeps the prometheus package to its two binaries (no node exporter etc.).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
