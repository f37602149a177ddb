"""A model under an S3 prefix (AWS or any S3-compatible store): ranged GETs straight into the caller's buffer.

Owns: one boto3 client shared by every reading thread (boto3 clients are thread-safe) with a connection
pool sized to ``[loader] concurrency``; each file's size and ETag from one HEAD (cached), so every range
of a file comes from the same object version; the checks that a response is exactly the range asked
for (206, ``Content-Range``, ``Content-Length``, ETag, body length) before and while its bytes land;
and the retry policy: exponential backoff with jitter on transient failures (5xx, throttling, connection
resets, timeouts, short bodies, a response for the wrong range), up to ``retries`` retries per range,
each range retried alone and resumed where its bytes stopped. botocore's own retries are switched off
(``total_max_attempts=1``) so this policy is the only one, and the tests can count it.

Must not: hold a whole range (or object) in an intermediate ``bytes`` (bodies are read piecewise into the
caller's memoryview), write outside ``[offset, offset + len(buf))`` of the object into ``buf``, retry an
error that cannot get better (403, 404, bad credentials, a range past the end, a changed object), accept
a body of the wrong length, or detect flipped bytes: a body of the right length is returned as it came,
and content is the loader's per-chunk xxh3 (against the manifest) to check.
"""

from __future__ import annotations

import http.client
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bex
import urllib3.exceptions
from botocore.config import Config as BotoConfig

from butterfly.weights.sources import SourceError, SourceNotFound, check_file_name, check_range

__all__ = ["S3Source", "S3Stats", "parse_s3_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Per socket read, not per request: an 8 MiB range that keeps trickling never hits it; a stalled one does.
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_BACKOFF_BASE_S = 0.2
DEFAULT_BACKOFF_MAX_S = 10.0
# Bytes asked of the socket per read into the buffer: large enough that per-call overhead vanishes,
# small enough that a stalled body is noticed per read timeout rather than per range.
PIECE_BYTES = 1 << 20

_S3_URL = re.compile(r"s3://([^/]+)(?:/(.*))?")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
# Codes S3 and compatible stores use for "slow down / try later" (some with a 400 or 403 status).
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_CREDENTIAL_ERRORS = (
    bex.NoCredentialsError,
    bex.PartialCredentialsError,
    bex.CredentialRetrievalError,
    bex.ProfileNotFound,
)
# Failures of the connection or of the body stream: the next attempt may well succeed.
_TRANSIENT_ERRORS = (
    bex.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError, ...
    bex.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    bex.IncompleteReadError,
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError while reading a body ourselves
    http.client.HTTPException,  # IncompleteRead, RemoteDisconnected
    OSError,  # ConnectionResetError, TimeoutError from the socket
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end; may be empty)."""
    m = _S3_URL.fullmatch(url)
    if m is None or not m.group(1):
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return m.group(1), (m.group(2) or "").strip("/")


@dataclass(frozen=True)
class S3Stats:
    """Counters since the source was opened: requests sent (HEAD and GET), retries, bytes landed."""

    requests: int
    retries: int
    bytes_read: int


@dataclass(frozen=True)
class _Object:
    size: int
    etag: str


class _Retry(Exception):
    """A response that was wrong in a way the next attempt may not be (wrong range, short body)."""


class _Permanent(Exception):
    """A response that no retry will fix (a range past the end, an object that changed)."""


class S3Source:
    """``Source`` over ``s3://bucket/prefix``; ``file`` names are keys under the prefix.

    Credentials come from boto3's standard chain (environment, shared files, SSO, container or
    instance role) unless ``session`` is given. ``retries`` is retries after the first attempt, per
    range. ``sleep`` and ``rng`` exist so tests can observe the backoff without waiting for it.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        concurrency: int = 4,
        retries: int = 3,
        session: Any = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1 or retries < 0:
            raise ValueError(f"concurrency must be >= 1 and retries >= 0, got {concurrency}, {retries}")
        self.bucket, self.prefix = parse_s3_url(url)
        self.retries = retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._head_locks: dict[str, threading.Lock] = {}
        self._requests = 0
        self._retried = 0
        self._bytes = 0
        self._closed = False
        # path_style False means bucket.endpoint, as the config documents; "auto" only where botocore
        # knows the endpoint (AWS), since it may fall back to path style for e.g. dotted bucket names.
        style = "path" if path_style else ("virtual" if endpoint_url else "auto")
        config = BotoConfig(
            s3={"addressing_style": style},
            # One attempt per call: our loop below is the retry policy (and what the tests count).
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=concurrency,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            tcp_keepalive=True,
            # Ranged GETs carry no full-object checksum; asking for one would only wrap the body in a
            # hashing stream. Content is verified by the manifest's per-chunk xxh3 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = session if session is not None else boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    # -- naming -------------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, file: str) -> str:
        check_file_name(file, self.description)
        return f"{self.prefix}/{file}" if self.prefix else file

    def url(self, file: str) -> str:
        """``s3://bucket/key`` of ``file``, as messages name it."""
        return f"s3://{self.bucket}/{self._key(file)}"

    @property
    def stats(self) -> S3Stats:
        with self._lock:
            return S3Stats(self._requests, self._retried, self._bytes)

    # -- the Source contract ------------------------------------------------------------------------

    def size(self, file: str) -> int:
        return self._object(file).size

    def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        want = len(buf)
        url = self.url(file)
        check_range(url, offset, want)
        obj = self._object(file)
        what = f"read of {url} range [{offset}, {offset + want}) ({want} bytes)"
        if offset + want > obj.size:
            raise SourceError(f"{what}: past the end of the {obj.size}-byte object")
        if want == 0:
            return
        key = self._key(file)
        # Bytes already landed survive a failed attempt: the retry asks only for the rest, and the
        # pinned ETag guarantees both parts come from the same object version.
        done = [0]

        def attempt() -> None:
            self._get_range(key, obj, offset, buf, done)

        self._with_retries(what, url, attempt)

    def read_small(self, file: str, limit: int) -> bytes:
        url = self.url(file)
        key = self._key(file)
        what = f"read of {url}"

        def attempt() -> bytes:
            self._count_request()
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", -1))
                if length > limit:
                    raise _Permanent(f"{length} bytes, larger than the {limit}-byte limit")
                # read() of a StreamingBody checks the length it got against Content-Length.
                data: bytes = body.read()
            finally:
                body.close()
            if len(data) != length:
                raise _Retry(f"body is {len(data)} bytes, Content-Length said {length}")
            with self._lock:
                self._bytes += len(data)
            return data

        return self._with_retries(what, url, attempt)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    # -- requests -----------------------------------------------------------------------------------

    def _count_request(self) -> None:
        with self._lock:
            if self._closed:
                raise _Permanent("source is closed")
            self._requests += 1

    def _object(self, file: str) -> _Object:
        with self._lock:
            cached = self._objects.get(file)
            if cached is not None:
                return cached
            head_lock = self._head_locks.setdefault(file, threading.Lock())
        # One HEAD per file even when every loader thread starts on the same shard at once.
        with head_lock:
            with self._lock:
                cached = self._objects.get(file)
            if cached is not None:
                return cached
            url = self.url(file)
            key = self._key(file)

            def attempt() -> _Object:
                self._count_request()
                resp = self._client.head_object(Bucket=self.bucket, Key=key)
                return _Object(int(resp["ContentLength"]), str(resp.get("ETag", "")))

            obj = self._with_retries(f"HEAD of {url}", url, attempt)
            with self._lock:
                self._objects[file] = obj
            return obj

    def _get_range(self, key: str, obj: _Object, offset: int, buf: memoryview, done: list[int]) -> None:
        """GET the part of ``[offset, offset + len(buf))`` not yet landed (``buf[done[0]:]``) into place,
        advancing ``done[0]`` as bytes land, so a failure part-way keeps what arrived."""
        rest = buf[done[0] :]
        n = len(rest)
        start = offset + done[0]
        last = start + n - 1
        self._count_request()
        extra = {"IfMatch": obj.etag} if obj.etag else {}
        resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}", **extra)
        body = resp["Body"]
        before = done[0]
        try:
            self._check_response(resp, obj, start, last, n)
            self._fill(body, rest, done)
        finally:
            with self._lock:
                self._bytes += done[0] - before
            if done[0] - before != n:
                _abandon(body)

    def _check_response(self, resp: dict[str, Any], obj: _Object, start: int, last: int, n: int) -> None:
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status != 206:
            raise _Retry(f"HTTP {status} instead of 206 Partial Content for bytes={start}-{last}")
        content_range = str(resp.get("ContentRange", ""))
        m = _CONTENT_RANGE.fullmatch(content_range)
        if m is None or (int(m.group(1)), int(m.group(2))) != (start, last):
            raise _Retry(f"Content-Range {content_range!r} is not the bytes {start}-{last} asked for")
        if m.group(3) != "*" and int(m.group(3)) != obj.size:
            raise _Permanent(f"object is now {m.group(3)} bytes, was {obj.size}: it changed during the load")
        etag = resp.get("ETag")
        if obj.etag and etag is not None and etag != obj.etag:
            raise _Permanent(f"object ETag is now {etag}, was {obj.etag}: it changed during the load")
        length = resp.get("ContentLength")
        if length != n:
            raise _Retry(f"Content-Length {length} for a {n}-byte range")

    def _fill(self, body: Any, buf: memoryview, done: list[int]) -> None:
        """Read exactly ``len(buf)`` body bytes into ``buf``, piece by piece, adding each to ``done[0]``."""
        n = len(buf)
        got = 0
        raw = _plain_http_response(body)
        while got < n:
            piece = buf[got : min(n, got + PIECE_BYTES)]
            k = raw.readinto(piece) if raw is not None else body.readinto(piece)
            if not k:
                raise _Retry(f"body ended after {got} of {n} bytes")
            got += k
            done[0] += k
        if raw is not None:
            if not raw.isclosed():
                raise _Retry(f"body continues past the {n} bytes of Content-Length")
            # We read around urllib3, so it cannot know the body is done: hand the connection back
            # ourselves (what urllib3 does once a body is exhausted) so the next range reuses it.
            body._raw_stream.release_conn()

    # -- the retry policy ---------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        cap = min(self._backoff_max_s, self._backoff_base_s * (2**attempt))
        # "Equal jitter": at least half the cap, so backoff really grows; the random half spreads
        # many nodes that failed together so they do not retry in lockstep.
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def _with_retries(self, what: str, url: str, attempt: Callable[[], T]) -> T:
        last = ""
        for i in range(self.retries + 1):
            if i:
                with self._lock:
                    self._retried += 1
                delay = self._backoff(i - 1)
                log.warning("%s: attempt %d failed (%s); retrying in %.2fs", what, i, last, delay)
                self._sleep(delay)
            try:
                return attempt()
            except _Permanent as e:
                raise SourceError(f"{what}: {e}") from None
            except _Retry as e:
                last = str(e)
            except bex.ClientError as e:
                last = self._client_error(what, url, e)
            except _CREDENTIAL_ERRORS as e:
                raise SourceError(
                    f"{what}: no usable AWS credentials ({e}); set them in the environment, the shared "
                    "credentials file or an instance/container role"
                ) from None
            except _TRANSIENT_ERRORS as e:
                last = f"{type(e).__name__}: {e}"
            except bex.BotoCoreError as e:
                raise SourceError(f"{what}: {type(e).__name__}: {e}") from None
        raise SourceError(f"{what} failed after {self.retries + 1} attempts; last error: {last}")

    def _client_error(self, what: str, url: str, e: bex.ClientError) -> str:
        """The retry reason for a transient S3 error response; raises for a permanent one."""
        error = e.response.get("Error", {})
        status = _status(e)
        code = str(error.get("Code", ""))
        message = str(error.get("Message", ""))
        if code in ("", str(status)):
            # A HEAD error has no body, so botocore's "code" is the status again: use its name.
            code, message = http.client.responses.get(status, "error"), ""
        reason = f"HTTP {status} {code}" + (f": {message}" if message else "")
        if status >= 500 or status == 429 or code in _THROTTLE_CODES:
            return reason
        if status == 404 or code in _NOT_FOUND_CODES:
            if code == "NoSuchBucket":
                raise SourceNotFound(f"{what}: bucket {self.bucket!r} does not exist ({reason})") from e
            raise SourceNotFound(f"{what}: {url} does not exist ({reason})") from e
        if status == 412 or code == "PreconditionFailed":
            raise SourceError(
                f"{what}: {url} changed during the load (ETag no longer matches; {reason})"
            ) from e
        if status == 403:
            raise SourceError(
                f"{what}: access to {url} denied; check the credentials and policy ({reason})"
            ) from e
        raise SourceError(f"{what}: {reason}") from e


def _status(e: bex.ClientError) -> int:
    try:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


def _plain_http_response(body: Any) -> http.client.HTTPResponse | None:
    """The ``http.client`` response under botocore's StreamingBody, when reading it directly is safe.

    ``readinto`` on it lands socket bytes straight in the caller's buffer; urllib3's own ``readinto``
    reads into a new ``bytes`` and copies, which costs a second pass over every byte. Safe only for an
    identity-encoded body urllib3 has not started on; anything else goes the public (copying) way.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or not hasattr(raw, "release_conn"):
        return None
    # A chunked body does not end when its bytes are read (the last chunk marker follows): urllib3's way.
    if fp.chunked or fp.length is None:
        return None
    encoding = str(raw.headers.get("content-encoding", "identity")).lower()
    if encoding not in ("", "identity") or getattr(raw, "_fp_bytes_read", 1) != 0:
        return None
    return fp


def _abandon(body: Any) -> None:
    """Drop a response whose body we did not read to the end: close it (never drain a wrong-sized body
    that may be a whole object) and give its pool slot back, as urllib3 does after a failed read."""
    try:
        body.close()
        raw = getattr(body, "_raw_stream", None)
        if raw is not None:
            raw.release_conn()
    except Exception:  # noqa: BLE001 - best effort on a connection already known to be bad
        pass
