"""The few Kubernetes API calls the operator makes, on plain dicts (wire form), 404 -> None.

Raw JSON (`_preload_content=False`) keeps objects exactly as the API server sent them, the same shape the pure
builders and status functions take and the unit tests write by hand.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubesloth.api.v1alpha1 import GROUP, PLURAL, VERSION

from .settings import ServerFeatures

EVENT_SOURCE = "kubesloth-operator"


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self._features: ServerFeatures | None = None

    def server_features(self) -> ServerFeatures:
        """What the API server's version allows (GET /version, read once and kept; an upgrade of the control plane
        is seen after an operator restart). Unreadable: the oldest supported (v1.20), not cached."""
        if self._features is None:
            try:
                info = _json(client.VersionApi(self.api_client).get_code(_preload_content=False))
            except (ApiException, OSError, ValueError):
                return ServerFeatures()
            self._features = ServerFeatures.from_version(info)
        return self._features

    @staticmethod
    def _or_none(call, *args, **kwargs) -> dict[str, Any] | None:
        try:
            return _json(call(*args, _preload_content=False, **kwargs))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    # FineTuneJobs
    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._or_none(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    def list_ftjs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            data = _json(self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                   _preload_content=False))
        else:
            data = _json(self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _preload_content=False))
        return data.get("items", [])

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                          {"status": status}, _preload_content=False)

    def delete_ftj(self, namespace: str, name: str, uid: str) -> None:
        body = client.V1DeleteOptions(propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid))
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body,
                                                        _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or a newer object with the same name (uid precondition)
                raise

    # Jobs, Pods, ConfigMaps
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._or_none(self.batch.read_namespaced_job, name, namespace)

    def create_job(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """dry_run: validated and admitted by the API server, not stored (dryRun=All)."""
        extra = {"dry_run": "All"} if dry_run else {}
        return _json(self.batch.create_namespaced_job(body["metadata"]["namespace"], body, _preload_content=False,
                                                      **extra))

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        # Foreground: the Job object stays until its pods are gone, so a resume cannot start a second trainer
        # next to a still-terminating one (both would write the same checkpoints).
        body = client.V1DeleteOptions(propagation_policy="Foreground", preconditions=client.V1Preconditions(uid=uid))
        try:
            self.batch.delete_namespaced_job(name, namespace, body=body, _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def stop_job(self, namespace: str, name: str, uid: str) -> None:
        """No more pods (parallelism 0; the running one gets SIGTERM), the failed ones and their logs kept: a run
        the operator decided is Failed while the Job would still retry (every version has parallelism)."""
        patch = {"metadata": {"uid": uid}, "spec": {"parallelism": 0}}  # the uid: a precondition (409 if replaced)
        try:
            self.batch.patch_namespaced_job(name, namespace, patch, _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = _json(self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))
        return data.get("items", [])

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._or_none(self.core.read_namespaced_config_map, name, namespace)

    def create_configmap(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        extra = {"dry_run": "All"} if dry_run else {}
        return _json(self.core.create_namespaced_config_map(body["metadata"]["namespace"], body,
                                                            _preload_content=False, **extra))

    def replace_configmap(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """PUT with the body's resourceVersion: refused (409) if the ConfigMap changed since it was read."""
        extra = {"dry_run": "All"} if dry_run else {}
        meta = body["metadata"]
        return _json(self.core.replace_namespaced_config_map(meta["name"], meta["namespace"], body,
                                                             _preload_content=False, **extra))

    # Events
    def post_event(self, ftj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = ftj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name'][:200]}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": ftj["apiVersion"], "kind": ftj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": kind,
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
