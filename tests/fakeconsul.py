"""A fake Consul agent for tests: a small aiohttp server that follows the shapes of Consul's documented
HTTP API (developer.hashicorp.com/consul/api-docs), because no Consul binary can be installed here.

It is NOT Consul. What it implements, with the documented request and response shapes:

* ``PUT /v1/agent/service/register`` (body: ID, Name, Tags, Address, Port, Meta, Check with TTL and
  DeregisterCriticalServiceAfter; query ``replace-existing-checks``) -- a TTL check starts
  ``critical``, as in Consul;
* ``PUT /v1/agent/service/deregister/<service id>``;
* ``PUT /v1/agent/check/pass|warn|fail/<check id>`` -- a passed TTL check turns ``critical`` when its
  TTL runs out, and a service critical for longer than DeregisterCriticalServiceAfter is removed;
  an unknown check id is a 500 with Consul's text ``CheckID "<id>" does not have associated TTL``
  (the agent's updateTTLCheck error, which its HTTP layer answers as an internal error);
* ``GET /v1/health/service/<name>`` with ``passing`` (``?passing`` or ``?passing=true``), answering
  entries of ``Node`` / ``Service`` / ``Checks`` (a ``serfHealth`` node check and the service's
  checks) and an ``X-Consul-Index`` header;
* ``GET /v1/catalog/service/<name>``;
* an ACL token: when the fake has one, every request without ``X-Consul-Token`` equal to it gets
  403 "ACL not found".

Missing on purpose: blocking queries, datacenters, ACL policies, HTTP/TCP/script checks, the KV store.
Tests add instances registered "through other agents" with ``add_remote`` and inspect ``requests``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's duration syntax as Consul accepts it ("10s", "1m30s", "1500ms") in seconds."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class Check:
    check_id: str
    name: str
    status: str = "critical"
    ttl_s: float | None = None
    expires: float | None = None
    deregister_after_s: float | None = None
    critical_since: float | None = None
    output: str = ""


@dataclass
class Instance:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    node: str = "fake-agent"
    node_address: str = "127.0.0.1"
    checks: list[Check] = field(default_factory=list)


class FakeConsul:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.instances: dict[str, Instance] = {}
        self.requests: list[tuple[str, str]] = []
        self.index = 1
        self.broken = False  # answer health queries with a body that is not JSON
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application(middlewares=[self._acl])
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self._deregister)
        app.router.add_put("/v1/agent/check/{status:pass|warn|fail}/{check_id}", self._update_check)
        app.router.add_get("/v1/health/service/{name}", self._health)
        app.router.add_get("/v1/catalog/service/{name}", self._catalog)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add_remote(
        self, name: str, service_id: str, address: str, port: int, *, meta: dict[str, str] | None = None,
        status: str = "passing", node: str = "other-agent", node_address: str = "127.0.0.9",
    ) -> Instance:  # fmt: skip
        """An instance registered through another agent, with one check in ``status``."""
        instance = Instance(
            service_id, name, address, port, meta=meta or {}, node=node, node_address=node_address,
            checks=[Check(f"service:{service_id}", "remote check", status=status)],
        )  # fmt: skip
        self.instances[service_id] = instance
        self.index += 1
        return instance

    # ---- behaviour -------------------------------------------------------------------------------

    def _expire(self) -> None:
        """Run the TTL and DeregisterCriticalServiceAfter clocks, as the agent does in the background."""
        now = time.monotonic()
        for instance in list(self.instances.values()):
            for check in instance.checks:
                if check.expires is not None and now > check.expires and check.status != "critical":
                    check.status, check.output, check.critical_since = "critical", "TTL expired", now
                    self.index += 1
                after = check.deregister_after_s
                if check.status == "critical" and after is not None and check.critical_since is not None:
                    if now - check.critical_since > after:
                        del self.instances[instance.service_id]
                        self.index += 1
                        break

    @web.middleware
    async def _acl(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.token is not None and request.headers.get("X-Consul-Token") != self.token:
            return web.Response(status=403, text="ACL not found")
        response: web.StreamResponse = await handler(request)
        return response

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name = body["Name"]
            service_id = body.get("ID") or name
            port = int(body.get("Port", 0))
            check_body = body.get("Check")
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc}")
        checks = []
        if check_body:
            try:
                ttl = parse_duration(check_body["TTL"]) if "TTL" in check_body else None
                dereg = check_body.get("DeregisterCriticalServiceAfter")
                checks.append(
                    Check(
                        check_body.get("CheckID") or f"service:{service_id}",
                        check_body.get("Name") or f"Service '{name}' check",
                        ttl_s=ttl,
                        deregister_after_s=parse_duration(dereg) if dereg else None,
                        critical_since=time.monotonic(),
                    )
                )
            except (ValueError, KeyError) as exc:
                return web.Response(status=400, text=f"Invalid check: {exc}")
        self.instances[service_id] = Instance(
            service_id, name, body.get("Address", ""), port, tags=list(body.get("Tags") or []),
            meta=dict(body.get("Meta") or {}), checks=checks,
        )  # fmt: skip
        self.index += 1
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        if self.instances.pop(service_id, None) is None:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        self.index += 1
        return web.Response(status=200)

    async def _update_check(self, request: web.Request) -> web.Response:
        self._expire()
        check_id = request.match_info["check_id"]
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[request.match_info["status"]]
        for instance in self.instances.values():
            for check in instance.checks:
                if check.check_id == check_id:
                    check.status = status
                    check.output = request.query.get("note", "")
                    now = time.monotonic()
                    check.expires = now + check.ttl_s if check.ttl_s is not None else None
                    check.critical_since = now if status == "critical" else None
                    self.index += 1
                    return web.Response(status=200)
        return web.Response(status=500, text=f'CheckID "{check_id}" does not have associated TTL')

    def _entries(self, name: str, passing_only: bool) -> list[Instance]:
        self._expire()
        found = [i for i in self.instances.values() if i.name == name]
        if passing_only:
            found = [i for i in found if all(c.status == "passing" for c in i.checks)]
        return sorted(found, key=lambda i: i.service_id)

    async def _health(self, request: web.Request) -> web.Response:
        if self.broken:
            return web.Response(status=200, text="<html>proxy error</html>", content_type="text/html")
        passing = request.query.get("passing")
        passing_only = passing is not None and passing.lower() not in ("false", "0")
        body = []
        for i in self._entries(request.match_info["name"], passing_only):
            node_check = {
                "Node": i.node,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
            }
            service_checks = [
                {"Node": i.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
                 "Output": c.output, "ServiceID": i.service_id, "ServiceName": i.name}
                for c in i.checks
            ]  # fmt: skip
            body.append(
                {
                    "Node": {"ID": "", "Node": i.node, "Address": i.node_address, "Datacenter": "dc1",
                             "Meta": {}},
                    "Service": {
                        "ID": i.service_id, "Service": i.name, "Tags": i.tags, "Address": i.address,
                        "Meta": i.meta, "Port": i.port, "Weights": {"Passing": 1, "Warning": 1},
                    },
                    "Checks": [node_check, *service_checks],
                }
            )  # fmt: skip
        return web.json_response(body, headers={"X-Consul-Index": str(self.index)})

    async def _catalog(self, request: web.Request) -> web.Response:
        body = [
            {"Node": i.node, "Address": i.node_address, "Datacenter": "dc1", "ServiceID": i.service_id,
             "ServiceName": i.name, "ServiceAddress": i.address, "ServicePort": i.port, "ServiceTags": i.tags,
             "ServiceMeta": i.meta}
            for i in self._entries(request.match_info["name"], passing_only=False)
        ]  # fmt: skip
        return web.json_response(body, headers={"X-Consul-Index": str(self.index)})
