"""Consul discovery: peers from the health API, this node registered with a TTL check.

Only documented HTTP API calls of the local Consul agent, over aiohttp (the Python Consul clients
are unmaintained):

* ``GET  /v1/health/service/<service>?passing=true`` -- instances whose checks all pass. The address
  is the service's ``Address``, or the node's when that is empty; the node id is the service's
  ``Meta.butterfly_node_id`` when present.
* ``PUT  /v1/agent/service/register`` -- this node as ``<service>-<node id>`` with a TTL check
  (``DeregisterCriticalServiceAfter`` so a node that died is eventually removed).
* ``PUT  /v1/agent/check/pass/service:<id>`` -- every TTL/3 from a task of its own while registered;
  an agent that no longer knows the check (restarted and forgot us) answers 500 "CheckID ... does
  not have associated TTL" (404 on agents that word it as not found): either re-registers.
* ``PUT  /v1/agent/service/deregister/<id>`` -- on ``deregister``/``close``.

``CONSUL_HTTP_TOKEN`` from the environment (or ``token=``) is sent as ``X-Consul-Token``. The reply
body is hostile input: it is decoded into typed structs and an entry with an impossible port is
dropped. This module must not dial peers, and it registers only this node.
"""

from __future__ import annotations

import asyncio
import logging
import os

import aiohttp
import msgspec

from butterfly.discovery import DiscoveryError, DiscoveryProvider, LocalNode, PeerAddress, sort_peers

log = logging.getLogger("butterfly.discovery")

META_NODE_ID = "butterfly_node_id"
META_ROLE = "butterfly_role"


class _Node(msgspec.Struct):
    address: str = msgspec.field(name="Address", default="")


class _Service(msgspec.Struct):
    id: str = msgspec.field(name="ID", default="")
    address: str = msgspec.field(name="Address", default="")
    port: int = msgspec.field(name="Port", default=0)
    meta: dict[str, str] | None = msgspec.field(name="Meta", default=None)


class _HealthEntry(msgspec.Struct):
    node: _Node = msgspec.field(name="Node")
    service: _Service = msgspec.field(name="Service")


_health_decoder = msgspec.json.Decoder(list[_HealthEntry])


def _duration(seconds: float) -> str:
    """Consul's duration syntax ("1500ms"); milliseconds keep fractional seconds exact enough."""
    return f"{max(1, round(seconds * 1000))}ms"


def _check_unknown(status: int, body: bytes) -> bool:
    """Whether the agent answered a TTL update with "no such check": Consul's agent returns its
    updateTTLCheck error as HTTP 500 ``CheckID "..." does not have associated TTL``; a 404 says the
    same. Any other 500 is the agent failing, and re-registering would not help."""
    return status == 404 or (status == 500 and b"does not have associated TTL" in body)


class ConsulProvider(DiscoveryProvider):
    name = "consul"

    def __init__(
        self,
        address: str,
        service: str,
        *,
        token: str | None = None,
        check_ttl_s: float = 15.0,
        deregister_after_s: float = 120.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.base = address.rstrip("/")
        self.service = service
        self.check_ttl_s = check_ttl_s
        self.deregister_after_s = max(deregister_after_s, 60.0)  # Consul's minimum is one minute
        self._token = token if token is not None else os.environ.get("CONSUL_HTTP_TOKEN") or None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._registered: LocalNode | None = None
        self._refresher: asyncio.Task[None] | None = None

    @property
    def service_id(self) -> str | None:
        return f"{self.service}-{self._registered.node_id}" if self._registered else None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"X-Consul-Token": self._token} if self._token else {}
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=headers)
        return self._session

    async def _call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, json: object = None
    ) -> tuple[int, bytes]:
        url = f"{self.base}{path}"
        try:
            async with self._http().request(method, url, params=params, json=json) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise DiscoveryError(f"Consul at {self.base} did not answer {method} {path}: {exc!r}") from None

    @staticmethod
    def _fail(method: str, path: str, status: int, body: bytes) -> DiscoveryError:
        text = body[:200].decode("utf-8", "replace").strip()
        return DiscoveryError(f"Consul answered {method} {path} with HTTP {status}: {text}")

    # ---- lookup ----------------------------------------------------------------------------------

    async def resolve(self) -> list[PeerAddress]:
        path = f"/v1/health/service/{self.service}"
        status, body = await self._call("GET", path, params={"passing": "true"})
        if status != 200:
            raise self._fail("GET", path, status, body)
        try:
            entries = _health_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise DiscoveryError(f"Consul's reply to GET {path} is not a health entry list: {exc}") from None
        peers = []
        for entry in entries:
            host = entry.service.address or entry.node.address
            if not host or not 1 <= entry.service.port <= 65535:
                log.warning("Consul entry %r has no usable address; left out", entry.service.id)
                continue
            node_id = (entry.service.meta or {}).get(META_NODE_ID) or None
            peers.append(PeerAddress(host, entry.service.port, node_id))
        return sort_peers(peers)

    # ---- membership ------------------------------------------------------------------------------

    async def register(self, node: LocalNode) -> None:
        """Register (or re-register) this node, pass its check once, and keep passing it."""
        self._registered = node
        await self._register_once()
        await self._pass_check()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _register_once(self) -> None:
        node = self._registered
        assert node is not None and self.service_id is not None
        meta = {META_NODE_ID: node.node_id, META_ROLE: node.role, **node.meta}
        body = {
            "ID": self.service_id,
            "Name": self.service,
            "Tags": [node.role],
            "Address": node.address.host,
            "Port": node.address.port,
            "Meta": meta,
            "Check": {
                "CheckID": f"service:{self.service_id}",
                "Name": "butterfly node alive",
                "TTL": _duration(self.check_ttl_s),
                "DeregisterCriticalServiceAfter": _duration(self.deregister_after_s),
            },
        }
        path = "/v1/agent/service/register"
        status, reply = await self._call("PUT", path, params={"replace-existing-checks": "true"}, json=body)
        if status != 200:
            raise self._fail("PUT", path, status, reply)
        log.info(
            "registered node %s in Consul as service %s (%s)", node.node_id, self.service, self.service_id
        )

    async def _pass_check(self) -> None:
        path = f"/v1/agent/check/pass/service:{self.service_id}"
        status, reply = await self._call("PUT", path)
        if _check_unknown(status, reply):
            await self._register_once()  # the agent lost our registration (restarted): put it back
            status, reply = await self._call("PUT", path)
        if status != 200:
            raise self._fail("PUT", path, status, reply)

    async def _keep_alive(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.check_ttl_s / 3)
            try:
                await self._pass_check()
            except DiscoveryError as exc:
                if not failing:
                    log.warning("cannot refresh this node's Consul check (retrying): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("Consul check of this node refreshed again")
                failing = False

    async def deregister(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._registered is None:
            return
        path = f"/v1/agent/service/deregister/{self.service_id}"
        self._registered = None
        status, reply = await self._call("PUT", path)
        if status not in (200, 404):
            raise self._fail("PUT", path, status, reply)

    async def close(self) -> None:
        try:
            await self.deregister()
        except DiscoveryError as exc:
            # Shutting down with Consul unreachable: the TTL check expires and Consul removes us later.
            log.warning("could not deregister from Consul: %s", exc)
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
