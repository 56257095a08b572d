"""The few Kubernetes API calls the scaler makes, each retried the same way.

Every call here is one verb on one resource; `CALLS` lists them, and the chart's Role
(deploy/helm/pwff/templates/rbac.yaml) grants exactly these, which tests/test_scaler.py checks
against what the emulator saw. Transient failures (5xx, 429, timeouts, refused connections) are
retried with exponential backoff by tenacity; a 403 is raised at once as `Forbidden` (retrying a
missing permission only hides it); 409 and 404 go back to the caller, which knows whether to
re-read or to ignore them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

T = TypeVar("T")

API_ERRORS = Counter(
    "pwff_scaler_api_errors_total",
    "Kubernetes API calls that failed, by verb, resource and reason (forbidden, conflict, server, timeout)",
    ["verb", "resource", "reason"],
)

# (API group, resource, verb): everything KubeApi calls; the chart's Role grants exactly these.
CALLS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("apps", "deployments", "get"),
        ("apps", "deployments", "list"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "delete"),
        ("apps", "deployments/scale", "patch"),
        ("", "pods", "list"),
    }
)


class Forbidden(RuntimeError):
    """The ServiceAccount may not make this call: an RBAC problem for a person to fix, not to retry."""

    def __init__(self, verb: str, resource: str, detail: str) -> None:
        super().__init__(f"forbidden: {verb} {resource}: {detail}")
        self.verb = verb
        self.resource = resource


def _transient(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        return error.status is not None and (error.status >= 500 or error.status == 429)
    return isinstance(error, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def _reason(error: BaseException) -> str:
    if isinstance(error, ApiException):
        if error.status == 403:
            return "forbidden"
        if error.status == 409:
            return "conflict"
        if error.status == 404:
            return "not_found"
        return "server" if (error.status or 0) >= 500 else f"http_{error.status}"
    return "timeout" if isinstance(error, urllib3.exceptions.TimeoutError | TimeoutError) else "connection"


class KubeApi:
    """apps/v1 Deployments (and their scale) and core/v1 Pods in one namespace."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        timeout_s: float = 10.0,
        attempts: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        # urllib3's own retries stay off: tenacity is the one place that decides what is retried.
        api_client.configuration.retries = False
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._retrying = retry(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=backoff_s, max=10 * backoff_s),
            stop=stop_after_attempt(attempts),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "Kubernetes API call failed (%s), attempt %d; retrying",
                state.outcome.exception() if state.outcome else None,
                state.attempt_number,
            ),
        )

    def _call(self, verb: str, resource: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def once() -> T:
            try:
                return fn(*args, _request_timeout=self.timeout_s, **kwargs)
            except Exception as error:
                API_ERRORS.labels(verb, resource, _reason(error)).inc()
                if isinstance(error, ApiException) and error.status == 403:
                    raise Forbidden(verb, resource, str(error.reason)) from error
                raise

        result: T = self._retrying(once)()
        return result

    # -- deployments ----------------------------------------------------------------------

    def get_deployment(self, name: str) -> Any:  # V1Deployment (Any: its optional fields are read defensively)
        return self._call("get", "deployments", self.apps.read_namespaced_deployment, name, self.namespace)

    def list_deployments(self, selector: str) -> list[Any]:  # V1Deployment
        result = self._call(
            "list", "deployments", self.apps.list_namespaced_deployment, self.namespace, label_selector=selector
        )
        return list(result.items or [])

    def create_deployment(self, body: dict[str, Any]) -> None:
        self._call("create", "deployments", self.apps.create_namespaced_deployment, self.namespace, body)

    def patch_deployment(self, name: str, body: dict[str, Any]) -> None:
        self._call("patch", "deployments", self.apps.patch_namespaced_deployment, name, self.namespace, body)

    def delete_deployment(self, name: str) -> None:
        # Background propagation: the ReplicaSet and pods go with it, the call does not wait.
        options = client.V1DeleteOptions(propagation_policy="Background")
        self._call("delete", "deployments", self.apps.delete_namespaced_deployment, name, self.namespace, body=options)

    def scale_deployment(self, name: str, replicas: int, resource_version: str | None) -> None:
        """Set replicas; with `resource_version` the API refuses (409) if the Deployment changed since read."""
        body: dict[str, Any] = {"spec": {"replicas": replicas}}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self._call(
            "patch", "deployments/scale", self.apps.patch_namespaced_deployment_scale, name, self.namespace, body
        )

    # -- pods -----------------------------------------------------------------------------

    def list_pods(self, selector: str) -> list[Any]:  # V1Pod
        result = self._call("list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        return list(result.items or [])


def conflict(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 409


def not_found(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 404


def api_client(host: str | None = None) -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere the kubeconfig; `host` (tests): that URL, no auth."""
    from kubernetes import config

    if host is not None:
        configuration = client.Configuration()
        configuration.host = host
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
