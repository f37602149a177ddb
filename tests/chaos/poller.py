"""Records one node's answers, from inside its network namespace: ``/status`` and ``/ready`` of the
node's API on loopback, about every ``--interval`` s, one JSON line each, until SIGTERM.

Run as ``ip netns exec HOST python -m tests.chaos.poller --port P --node ID --out FILE``. Each line:
``{"t": monotonic seconds, "node": ID, "kind": "status"|"ready", "code": int|null, "body": {...}|null}``;
CLOCK_MONOTONIC is one clock for every namespace, so lines of all nodes merge into one history. A
frozen or dead node shows as ``code: null`` (no answer within the timeout).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

STATUS_KEYS = (
    "node_id", "state", "phase", "term", "epoch", "coordinator", "role", "may_serve", "cluster_size",
    "waiting_reason", "children",
)  # fmt: skip


def _get(url: str, timeout: float, body: dict[str, Any] | None = None) -> tuple[int | None, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    base = f"http://127.0.0.1:{args.port}"
    model: str | None = None
    rounds = 0
    with open(args.out, "a", buffering=1) as out:
        while not stop:
            rounds += 1
            if rounds % 3 == 0:
                # A request served for real: one token. It records only whether it was served (200);
                # the checker ties it to the node's /ready answers around it.
                if model is None:
                    _, models = _get(f"{base}/v1/models", timeout=0.5)
                    listed = models.get("data") if isinstance(models, dict) else None
                    model = listed[0].get("id") if listed else None
                if model is not None:
                    sent = time.monotonic()
                    request = {"model": model, "prompt": "chaos", "max_tokens": 1}
                    code, _ = _get(f"{base}/v1/completions", timeout=2.0, body=request)
                    line = {"t": sent, "node": args.node, "kind": "serve", "code": code, "body": None}
                    out.write(json.dumps(line) + "\n")
            for kind in ("ready", "status"):
                sent = time.monotonic()
                code, body = _get(f"{base}/{kind}", timeout=0.5)
                if kind == "status" and isinstance(body, dict):
                    body = {k: body.get(k) for k in STATUS_KEYS}
                # The answer was made between sending and receiving: the send time is the earliest it
                # can have been, so a 200 judged late by it was late for certain (no false alarms).
                out.write(
                    json.dumps({"t": sent, "node": args.node, "kind": kind, "code": code, "body": body})
                    + "\n"
                )
            time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
