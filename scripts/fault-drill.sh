#!/usr/bin/env bash
# The fault drill (tests/integration/test_faults.py): the services as separate processes over a RabbitMQ
# node and a redis-server of its own (ports 5691-5699 and 6391-6399; the brokers on 5672 and 6379 are not
# touched), with the aggregator and the scheduler SIGKILLed mid-round, RabbitMQ and Redis (AOF) restarted
# mid-job: each job succeeds with the undisturbed run's adapter, bit for bit. Then Redis restarted without
# persistence (the job fails with the reason; services stay up) and a round no worker can finish (fails at
# its deadline). A few minutes on a laptop. Extra arguments go to pytest (e.g. -k rabbitmq).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
for server in redis-server rabbitmq-server; do
  command -v "$server" >/dev/null || { echo "$server is missing (scripts/ensure-services.sh installs it)" >&2; exit 1; }
done
export PWFF_TORCH_THREADS=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
exec "$python" -m pytest -m faults -v tests/integration/test_faults.py "$@"
