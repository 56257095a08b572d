"""`python -m services.scaler`: the scaler against the Kubernetes API, RabbitMQ and Redis (PWFF_*, PWFF_SCALER_*)."""

from __future__ import annotations

from pathlib import Path

from services.scaler.kube import KubeApi, api_client
from services.scaler.scaler import Scaler, ScalerReadiness
from shared.bus.rabbitmq import RabbitBus
from shared.health import serve_probes
from shared.runtime import run_until_signalled
from shared.settings import ScalerSettings, Settings, configure_process
from shared.store.redis import RedisStore

_POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kube_namespace(configured: str, pod_namespace: Path = _POD_NAMESPACE) -> str:
    """The configured namespace, else the pod's own (its ServiceAccount's), else 'default'."""
    if configured:
        return configured
    try:
        return pod_namespace.read_text().strip() or "default"
    except OSError:
        return "default"


def main() -> None:
    settings = Settings()
    scaler_settings = ScalerSettings()
    configure_process(settings)
    kube = KubeApi(
        api_client(), kube_namespace(scaler_settings.kube_namespace), timeout_s=scaler_settings.request_timeout_s
    )
    scaler = Scaler(
        kube,
        RabbitBus(settings.rabbitmq_url),
        RedisStore(settings.redis_url),
        scaler_settings,
        namespace=settings.namespace,
    )
    # /healthz, /readyz, /metrics
    probes = serve_probes(scaler_settings.metrics_port, ScalerReadiness(scaler), settings.probes_host)
    try:
        run_until_signalled(scaler.run)
    finally:
        if probes is not None:
            probes.close()


if __name__ == "__main__":
    main()
