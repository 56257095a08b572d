#!/usr/bin/env bash
# Make sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer; install and start them if not.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
rabbit_up() { timeout 20 rabbitmqctl -q status >/dev/null 2>&1 && timeout 5 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! redis_up; then
  echo "starting redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
fi
if ! rabbit_up; then
  echo "starting rabbitmq" >&2
  rabbitmq-server -detached || true
  rabbitmqctl await_startup --timeout 120
  for _ in $(seq 60); do rabbit_up && break; sleep 1; done
fi
redis_up || { echo "redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
rabbit_up || { echo "rabbitmq does not answer on 127.0.0.1:5672" >&2; exit 1; }
echo "rabbitmq and redis are up" >&2
