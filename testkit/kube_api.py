"""A recorded fake of the Kubernetes API for what the pod tier cannot play: Deployments, Services and their pods' status.

The run's own model server is a Deployment and a Service (``operators.model_server``); podman has no
controller to run a Deployment, and no DNS to reach a Service. This fake answers the calls the
setup, teardown and janitor make (``AppsV1Api`` and ``CoreV1Api`` methods, by the same names and
arguments), as the API server would: objects are checked against Kubernetes 1.33's schema, a
second create is 409, a missing object 404, label selectors filter lists. Each call is recorded
as the authorizer sees it (apiGroup, resource, verb), so RBAC can be derived from them.

Nothing here runs a container: a test sets the status a pod of a Deployment would report
(``pod_status``) and the events (``event``). Creation times come from a counter, not the clock.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from testkit.cluster import matches

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class FakeApi:
    """One namespace's Deployments, Services, pods and events; ``apps`` and ``core`` are its two API facets."""

    namespace: str = "vqa"
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, Any] = field(default_factory=dict)  # Deployment name -> the V1Pod a test says its pod is
    events: list[Any] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    scaled: dict[str, int] = field(default_factory=dict)
    # what a Deployment's pod reports once it has its replica (None: no pod appears)
    pod_on_scale: dict[str, Any] | None = None
    _created: int = 0

    # -- as the API server answers

    def _call(self, group: str, resource: str, verb: str) -> None:
        self.calls.append((group, resource, verb))

    @staticmethod
    def _error(status: int, message: str) -> Exception:
        from kubernetes.client.exceptions import ApiException

        err = ApiException(status=status, reason=message)
        err.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
        return err

    def _create(self, store: dict[str, dict[str, Any]], kind: str, namespace: str, body: Any) -> Any:
        import kubernetes_validate
        from kubernetes.client import ApiClient

        manifest = json.loads(json.dumps(body if isinstance(body, dict) else ApiClient().sanitize_for_serialization(body)))
        name = manifest["metadata"]["name"]
        if namespace != self.namespace:
            raise self._error(404, f'namespaces "{namespace}" not found')
        try:
            kubernetes_validate.validate(manifest, "1.33", strict=True)
        except kubernetes_validate.ValidationError as err:
            raise self._error(422, f"{kind} {name!r} is invalid: {err}") from None
        if kind == "Deployment":  # what the apps validation refuses beyond the schema (pkg/apis/apps/validation)
            template = manifest["spec"]["template"]["spec"]
            if template.get("activeDeadlineSeconds") is not None:
                raise self._error(
                    422,
                    f'Deployment.apps "{name}" is invalid: spec.template.spec.activeDeadlineSeconds: Forbidden: '
                    f"activeDeadlineSeconds in ReplicaSet is not Supported",
                )
            if template.get("restartPolicy", "Always") != "Always":
                raise self._error(
                    422,
                    f'Deployment.apps "{name}" is invalid: spec.template.spec.restartPolicy: Unsupported value: '
                    f'"{template["restartPolicy"]}": supported values: "Always"',
                )
        if name in store:
            raise self._error(409, f'{kind.lower()}s "{name}" already exists')
        self._created += 1
        manifest["metadata"]["creationTimestamp"] = (EPOCH + dt.timedelta(seconds=self._created)).isoformat()
        store[name] = manifest
        return self._model(manifest, f"V1{kind}")

    @staticmethod
    def _model(manifest: dict[str, Any], kind: str) -> Any:
        from kubernetes.client import ApiClient

        @dataclass
        class Response:
            data: str

        return ApiClient().deserialize(Response(json.dumps(manifest)), kind)

    def _read(self, store: dict[str, dict[str, Any]], kind: str, name: str, namespace: str) -> Any:
        if namespace != self.namespace or name not in store:
            raise self._error(404, f'{kind.lower()}s "{name}" not found')
        return self._model(store[name], f"V1{kind}")

    def _delete(self, store: dict[str, dict[str, Any]], kind: str, name: str, namespace: str) -> None:
        if namespace != self.namespace or name not in store:
            raise self._error(404, f'{kind.lower()}s "{name}" not found')
        del store[name]
        if kind == "Deployment":
            self.pods.pop(name, None)

    # -- what a test sets

    def pod_status(self, deployment: str, status: dict[str, Any]) -> None:
        """The pod of ``deployment`` reports ``status`` (a PodStatus as JSON) from now on."""
        self.pods[deployment] = self._model(
            {
                "metadata": {"name": f"{deployment}-7d9f8-x2x4q", "labels": {"app.kubernetes.io/instance": deployment}},
                "status": status,
            },
            "V1Pod",
        )

    def event(self, pod: str, reason: str, message: str) -> None:
        self.events.append(
            self._model(
                {
                    "metadata": {"name": f"{pod}.1"},
                    "involvedObject": {"kind": "Pod", "name": pod},
                    "reason": reason,
                    "message": message,
                },
                "CoreV1Event",
            )
        )

    @property
    def apps(self) -> Apps:
        return Apps(self)

    @property
    def core(self) -> Core:
        return Core(self)


@dataclass
class Apps:
    """``kubernetes.client.AppsV1Api``'s calls, answered by the fake."""

    api: FakeApi

    def create_namespaced_deployment(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        self.api._call("apps", "deployments", "create")
        return self.api._create(self.api.deployments, "Deployment", namespace, body)

    def read_namespaced_deployment(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self.api._call("apps", "deployments", "get")
        return self.api._read(self.api.deployments, "Deployment", name, namespace)

    def list_namespaced_deployment(self, namespace: str, label_selector: str | None = None, **kwargs: Any) -> Any:
        from kubernetes.client import models as k8s

        self.api._call("apps", "deployments", "list")
        found = [
            d
            for d in self.api.deployments.values()
            if namespace == self.api.namespace and matches(d["metadata"].get("labels") or {}, label_selector)
        ]
        return k8s.V1DeploymentList(items=[self.api._model(d, "V1Deployment") for d in found])

    def patch_namespaced_deployment_scale(self, name: str, namespace: str, body: Any, **kwargs: Any) -> Any:
        self.api._call("apps", "deployments/scale", "patch")
        if namespace != self.api.namespace or name not in self.api.deployments:
            raise self.api._error(404, f'deployments.apps "{name}" not found')
        replicas = int(body["spec"]["replicas"])
        self.api.deployments[name]["spec"]["replicas"] = replicas
        self.api.scaled[name] = replicas
        if replicas and self.api.pod_on_scale is not None:
            self.api.pod_status(name, self.api.pod_on_scale)
        return body

    def delete_namespaced_deployment(self, name: str, namespace: str, **kwargs: Any) -> None:
        self.api._call("apps", "deployments", "delete")
        self.api._delete(self.api.deployments, "Deployment", name, namespace)


@dataclass
class Core:
    """``kubernetes.client.CoreV1Api``'s calls for Services, and the pods' status and events, answered by the fake."""

    api: FakeApi

    def create_namespaced_service(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        self.api._call("", "services", "create")
        return self.api._create(self.api.services, "Service", namespace, body)

    def read_namespaced_service(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self.api._call("", "services", "get")
        return self.api._read(self.api.services, "Service", name, namespace)

    def delete_namespaced_service(self, name: str, namespace: str, **kwargs: Any) -> None:
        self.api._call("", "services", "delete")
        self.api._delete(self.api.services, "Service", name, namespace)

    def list_namespaced_pod(self, namespace: str, label_selector: str | None = None, **kwargs: Any) -> Any:
        from kubernetes.client import models as k8s

        self.api._call("", "pods", "list")
        pods = [p for p in self.api.pods.values() if matches(p.metadata.labels or {}, label_selector)]
        return k8s.V1PodList(items=pods)

    def list_namespaced_event(self, namespace: str, field_selector: str | None = None, **kwargs: Any) -> Any:
        from kubernetes.client import models as k8s

        self.api._call("", "events", "list")
        return k8s.CoreV1EventList(items=list(self.api.events))
