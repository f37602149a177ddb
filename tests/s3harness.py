"""A real S3 server on loopback for the tests: s3rver (npm), installed on first use and run per session.

Owns: installing the pinned s3rver into ``tests/.s3rver/`` (gitignored; ``BUTTERFLY_S3RVER_DIR``
overrides) with ``npm install`` when it is missing, starting it on 127.0.0.1 with a free port and a
temporary data directory, accepting any access key (except ones starting with ``DENIED``, which it
refuses with 403 InvalidAccessKeyId, so bad credentials can be tested against the real server), and
stopping it; plus ``measure_throughput`` for the loopback S3 read benchmark (``python -m tests.s3harness``).

Must not: reach any address but loopback, leave the server running after the tests (it also exits when
its stdin closes, so a killed test run cannot leak it), or depend on AWS credentials in the
environment (the clients it makes carry their own dummy keys).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3RVER_VERSION = "3.7.1"
INSTALL_DIR = Path(os.environ.get("BUTTERFLY_S3RVER_DIR", Path(__file__).parent / ".s3rver"))
ACCESS_KEY = "butterfly-test"
SECRET_KEY = "butterfly-test-secret"
DENIED_KEY = "DENIED-butterfly"
REGION = "us-east-1"
_START_TIMEOUT_S = 30.0
_INSTALL_TIMEOUT_S = 300.0

# Started with `node -e`. Any access key but DENIED* maps to s3rver's built-in account, and every
# request signed with SigV4 must carry the signature SECRET_KEY gives: s3rver 3.7.1 checks only V2
# signatures (allowMismatchedSignatures: false), so the middleware below checks V4 the way S3 does
# (canonical request, string to sign, derived key) and answers SignatureDoesNotMatch otherwise.
# Unsigned (anonymous) requests pass to s3rver unchanged. Prints {"port": N} once listening; exits
# when stdin closes (our end of the pipe).
_LAUNCHER = r"""
const S3rver = require('s3rver');
const AWSAccount = require('s3rver/lib/models/account');
const registry = AWSAccount.registry;
const known = registry.get.bind(registry);
registry.get = (key) => {
  if (typeof key === 'string' && key.startsWith('DENIED')) return undefined;
  return known(key) || AWSAccount.DUMMY_ACCOUNT;
};
const [directory, buckets, secretKey] = [process.argv[1], JSON.parse(process.argv[2]), process.argv[3]];
const server = new S3rver({
  address: '127.0.0.1', port: 0, directory, silent: true,
  allowMismatchedSignatures: false, vhostBuckets: false,
  configureBuckets: buckets.map((name) => ({ name, configs: [] })),
});
// s3rver 3.7.1 treats a range end of 0 as "no end" (`if (end)`, `options.end || Infinity`), so
// "bytes=0-0" is answered with the whole object where S3 sends one byte: serve that byte ourselves.
const fs = require('fs');
server.middleware.unshift(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.headers['range'] === 'bytes=0-0') {
    const store = ctx.store;
    ctx.store = Object.create(store);
    ctx.store.getObject = async (bucket, key, options) => {
      const object = await store.getObject(bucket, key, options);
      if (object && object.content && object.size > 0) {
        object.content.destroy();
        const path = store.getResourcePath(bucket, key, 'object');
        object.content = fs.createReadStream(path, { start: 0, end: 0 });
        object.range = { start: 0, end: 0 };
      }
      return object;
    };
  }
  return next();
});
// SigV4 (docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html), header form.
const crypto = require('crypto');
const hmac = (key, text) => crypto.createHmac('sha256', key).update(text, 'utf8').digest();
const sha256 = (text) => crypto.createHash('sha256').update(text, 'utf8').digest('hex');
const uriEncode = (text) => encodeURIComponent(text).replace(/[!'()*]/g,
  (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
const decode = (text) => decodeURIComponent(text.replace(/\+/g, '%20'));
function canonicalQuery(raw) {
  if (!raw) return '';
  return raw.split('&').filter((p) => p.length > 0).map((p) => {
    const i = p.indexOf('=');
    const [k, v] = i < 0 ? [p, ''] : [p.slice(0, i), p.slice(i + 1)];
    return [uriEncode(decode(k)), uriEncode(decode(v))];
  }).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`).join('&');
}
function signatureError(ctx, message) {
  ctx.status = 403;
  ctx.type = 'application/xml';
  ctx.body = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code>' +
    `<Message>${message}</Message></Error>`;
}
server.middleware.unshift(async (ctx, next) => {
  const auth = ctx.headers['authorization'];
  if (!auth || !auth.startsWith('AWS4-HMAC-SHA256 ')) return next();
  const fields = {};
  for (const part of auth.slice('AWS4-HMAC-SHA256 '.length).split(',')) {
    const i = part.indexOf('=');
    fields[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  const [accessKey, ...scopeParts] = (fields.Credential || '').split('/');
  if (accessKey.startsWith('DENIED')) return next();  // s3rver answers InvalidAccessKeyId
  const scope = scopeParts.join('/');
  const signed = (fields.SignedHeaders || '').split(';');
  const [path, query] = (() => { const i = ctx.req.url.indexOf('?');
    return i < 0 ? [ctx.req.url, ''] : [ctx.req.url.slice(0, i), ctx.req.url.slice(i + 1)]; })();
  const headers = ctx.req.headers;
  const canonical = [
    ctx.method, path, canonicalQuery(query),
    signed.map((h) => `${h}:${String(headers[h] ?? '').trim().replace(/\s+/g, ' ')}\n`).join(''),
    signed.join(';'), headers['x-amz-content-sha256'] || sha256(''),
  ].join('\n');
  const toSign = ['AWS4-HMAC-SHA256', headers['x-amz-date'], scope, sha256(canonical)].join('\n');
  const [date, region, service] = scopeParts;
  let key = hmac('AWS4' + secretKey, date || '');
  for (const part of [region || '', service || '', 'aws4_request']) key = hmac(key, part);
  const expected = crypto.createHmac('sha256', key).update(toSign, 'utf8').digest('hex');
  if (!signed.includes('host') || scopeParts.length !== 4 || fields.Signature !== expected) {
    return signatureError(ctx, 'The request signature we calculated does not match the one you sent.');
  }
  return next();
});
server.run().then((addr) => {
  process.stdout.write(JSON.stringify({ port: addr.port }) + '\n');
}, (err) => { console.error(err); process.exit(2); });
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
"""


def resign_sigv4(method: str, target: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sign a request again with the test credentials after a proxy changed its headers (the S3
    server checks SigV4): ``target`` is the request's path and query, the Host header its host."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    dropped = {"authorization", "x-amz-date", "x-amz-content-sha256"}
    kept = [(k, v) for k, v in headers if k.lower() not in dropped]
    host = next(v for k, v in headers if k.lower() == "host")
    request = AWSRequest(method=method, url=f"http://{host}{target}", headers=dict(kept), data=b"")
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    return kept + [(k, v) for k, v in request.headers.items() if k.lower() in dropped]


class S3HarnessError(RuntimeError):
    pass


def _module_dir() -> Path:
    return INSTALL_DIR / "node_modules" / "s3rver"


def _installed_version() -> str | None:
    try:
        return str(json.loads((_module_dir() / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_s3rver() -> Path:
    """The installed s3rver's node_modules dir, installing the pinned version first when needed.

    Concurrent pytest-xdist workers serialise on a lock file, so only one runs npm.
    """
    if _installed_version() == S3RVER_VERSION:
        return INSTALL_DIR / "node_modules"
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise S3HarnessError(
            "the S3 tests need node and npm (s3rver is an npm package): install nodejs and npm"
        )
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() != S3RVER_VERSION:
            cmd = [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--loglevel=error",
                "--prefix",
                str(INSTALL_DIR),
                f"s3rver@{S3RVER_VERSION}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
            if proc.returncode != 0 or _installed_version() != S3RVER_VERSION:
                raise S3HarnessError(
                    f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
                )
    return INSTALL_DIR / "node_modules"


@dataclass
class S3Server:
    """A running s3rver. ``endpoint`` is ``http://127.0.0.1:PORT``."""

    process: subprocess.Popen[str]
    port: int
    directory: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def session(self, access_key: str = ACCESS_KEY) -> Any:
        """A boto3 session holding dummy keys, so nothing is read from the environment or ~/.aws."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )

    def client(self, *, access_key: str = ACCESS_KEY, endpoint: str | None = None) -> Any:
        """A plain boto3 client (path-style, dummy keys) for setting up and for baseline downloads."""
        from botocore.config import Config as BotoConfig

        return self.session(access_key).client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=16),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_s3rver(directory: Path, buckets: tuple[str, ...] = ()) -> S3Server:
    """Start s3rver on a free loopback port serving ``directory`` with ``buckets`` created."""
    modules = ensure_s3rver()
    env = {**os.environ, "NODE_PATH": str(modules)}
    proc = subprocess.Popen(
        ["node", "-e", _LAUNCHER, str(directory), json.dumps(list(buckets)), SECRET_KEY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # s3rver is silent; anything on stderr is a crash worth seeing in the test log
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(_START_TIMEOUT_S)
    if not line or not line[0].strip():
        proc.kill()
        proc.wait()
        raise S3HarnessError(f"s3rver did not start within {_START_TIMEOUT_S}s (exit {proc.poll()})")
    port = int(json.loads(line[0])["port"])
    return S3Server(proc, port, directory)


@contextlib.contextmanager
def running_s3rver(buckets: tuple[str, ...] = ()) -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="butterfly-s3rver-") as tmp:
        server = start_s3rver(Path(tmp), buckets)
        try:
            yield server
        finally:
            server.stop()


def upload_dir(client: Any, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every regular file of ``local`` (flat, as a model dir is) under ``prefix/``; return names."""
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    for name in names:
        client.upload_file(str(local / name), bucket, f"{prefix}/{name}")
    return names


# ---------------------------------------------------------------------------------------------------
# Throughput: S3Source.read_into against the plain boto3 ways of getting the same object.
# ---------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], int], repeats: int) -> float:
    """Best MB/s (10**6 bytes/s) over ``repeats`` runs: best-of, since the machine is shared and noisy."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = fn()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e6)
    return best


def measure_throughput(
    server: S3Server,
    *,
    size: int = 256 << 20,
    chunk: int = 8 << 20,
    concurrency: int = 4,
    repeats: int = 3,
    bucket: str = "bench",
) -> dict[str, float]:
    """MB/s of reading one ``size``-byte object into memory, each way, in the same run.

    ``s3source``: ``S3Source.read_into`` of ``chunk``-byte ranges, ``concurrency`` threads, into one
    preallocated buffer (what the loader does). ``get_object``: one plain ``get_object().read()``.
    ``download_fileobj``: boto3's managed transfer (ranged GETs on its own threads, ``chunk`` parts,
    ``concurrency`` threads) into an in-memory file. ``download_file``: the same into a file in a tmpfs
    when there is one. ``ratio_*``: s3source over each; ``ratio_best``: over the best of them.
    """
    import io

    from boto3.s3.transfer import TransferConfig

    from butterfly.weights.sources.s3 import S3Source

    client = server.client()
    with contextlib.suppress(
        client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
    ):
        client.create_bucket(Bucket=bucket)
    key = f"bench/blob-{size}"
    with tempfile.NamedTemporaryFile(prefix="butterfly-bench-") as f:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
        f.flush()
        client.upload_file(f.name, bucket, key)

    buf = bytearray(size)
    view = memoryview(buf)
    source = S3Source(
        f"s3://{bucket}/bench",
        endpoint_url=server.endpoint,
        region=REGION,
        path_style=True,
        concurrency=concurrency,
        retries=0,
        session=server.session(),
    )

    def via_source() -> int:
        ranges = [(o, min(chunk, size - o)) for o in range(0, size, chunk)]
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda r: source.read_into(f"blob-{size}", r[0], view[r[0] : r[0] + r[1]]), ranges))
        return size

    def via_get_object() -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    transfer = TransferConfig(
        multipart_chunksize=chunk, max_concurrency=concurrency, multipart_threshold=chunk
    )

    def via_fileobj() -> int:
        out = io.BytesIO()
        client.download_fileobj(bucket, key, out, Config=transfer)
        return out.tell()

    shm = Path("/dev/shm")
    target_dir = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None

    def via_file() -> int:
        with tempfile.TemporaryDirectory(dir=target_dir) as d:
            path = Path(d) / "blob"
            client.download_file(bucket, key, str(path), Config=transfer)
            return path.stat().st_size

    try:
        via_source()  # warm the connection pool and the server's page cache
        results = {
            "s3source": _timed(via_source, repeats),
            "get_object": _timed(via_get_object, repeats),
            "download_fileobj": _timed(via_fileobj, repeats),
            "download_file": _timed(via_file, repeats),
        }
        source_bytes = bytes(view[:4096])
        expected = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")["Body"].read()
        if source_bytes != expected:
            raise AssertionError("S3Source read different bytes than boto3 for the benchmark object")
    finally:
        source.close()
        view.release()
    baselines = ("get_object", "download_fileobj", "download_file")
    for name in baselines:
        results[f"ratio_{name}"] = results["s3source"] / results[name]
    results["ratio_best"] = results["s3source"] / max(results[name] for name in baselines)
    return results


def main(argv: list[str]) -> int:
    """``python -m tests.s3harness [OBJECT_MIB [CHUNK_MIB [CONCURRENCY [REPEATS]]]]`` (256, 8, 4, 3)."""
    args = [int(a) for a in argv[1:]]
    size_mib, chunk_mib, concurrency, repeats = args + [256, 8, 4, 3][len(args) :]
    with running_s3rver(("bench",)) as server:
        results = measure_throughput(
            server, size=size_mib << 20, chunk=chunk_mib << 20, concurrency=concurrency, repeats=repeats
        )
    print(
        f"object {size_mib} MiB, {chunk_mib} MiB chunks, concurrency {concurrency}, best of {repeats}, "
        f"loopback s3rver {S3RVER_VERSION}"
    )
    for name, value in results.items():
        unit = "" if name.startswith("ratio") else " MB/s"
        print(f"  {name:24} {value:8.2f}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
