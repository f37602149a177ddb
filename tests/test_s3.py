"""S3Source against a real S3 server (s3rver) on loopback, with faults injected by a proxy in front of it.

Every fault test asserts both the bytes the caller got and what went over the wire (the proxy's log):
how many requests, for which ranges, and that a retry asked only for what was still missing.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import butterfly.weights.sources.s3 as s3mod
from butterfly.config import parse_config
from butterfly.weights.layout import CONFIG_FILE, INDEX_FILE, load_layout, load_layout_from_source
from butterfly.weights.safetensors import ModelFormatError
from butterfly.weights.sources import Source, SourceError, SourceNotFound, open_source
from butterfly.weights.sources.s3 import PIECE_BYTES, S3Source, parse_s3_url
from butterfly.weights.testmodel import make_test_model
from tests.faultproxy import Fault, FaultProxy
from tests.s3harness import (
    ACCESS_KEY,
    DENIED_KEY,
    REGION,
    SECRET_KEY,
    S3Server,
    measure_throughput,
    resign_sigv4,
    running_s3rver,
    upload_dir,
)

BUCKET = "models"
PREFIX = "llama"
URL = f"s3://{BUCKET}/{PREFIX}"
SHARD = "model-00001-of-00002.safetensors"
RETRIES = 3
OFFSET = 100_000
LENGTH = 3 << 20  # spans several of the source's 1 MiB socket reads


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with running_s3rver((BUCKET, "scratch")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_model(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~8 MB test model (shards of a few MiB: ranges cross the source's 1 MiB read pieces)."""
    local = make_test_model(tmp_path_factory.mktemp("s3") / "m", layers=4, hidden=256, vocab=2048, shards=2)
    upload_dir(s3.client(), local, BUCKET, PREFIX)
    return local


@pytest.fixture(scope="session")
def shard_bytes(s3_model: Path) -> bytes:
    return (s3_model / SHARD).read_bytes()


@pytest.fixture(scope="session")
def session_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3.port, resign=resign_sigv4).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(session_proxy: FaultProxy) -> Iterator[FaultProxy]:
    session_proxy.clear()
    yield session_proxy
    session_proxy.clear()


@pytest.fixture(autouse=True)
def _no_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    # Were credentials ever looked up from the chain, botocore must not try the EC2 metadata address.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class Sleeps:
    """Records the backoff delays instead of sleeping them (tests stay fast; the policy stays visible)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.delays.append(seconds)


def source(s3: S3Server, endpoint: str | None = None, *, access_key: str = ACCESS_KEY, **kw: Any) -> S3Source:
    options: dict[str, Any] = {
        "endpoint_url": endpoint or s3.endpoint,
        "region": REGION,
        "path_style": True,
        "concurrency": 4,
        "retries": RETRIES,
        "session": s3.session(access_key),
        "read_timeout_s": 5.0,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.005,
    }
    url = kw.pop("url", URL)
    options.update(kw)
    return S3Source(url, **options)


def read(src: S3Source, file: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(file, offset, memoryview(buf))
    return bytes(buf)


def gets(proxy: FaultProxy, file: str = SHARD) -> list[str | None]:
    """Range headers of the GETs of ``file`` the proxy saw, in order."""
    return [e.range for e in proxy.log("GET", f"/{BUCKET}/{PREFIX}/{file}")]


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def test_random_ranges_equal_the_file_bytes(s3: S3Server, s3_model: Path) -> None:
    src = source(s3)
    rng = random.Random(1234)
    try:
        assert isinstance(src, Source)
        assert src.description == URL
        for name in sorted(p.name for p in s3_model.glob("*.safetensors")):
            data = (s3_model / name).read_bytes()
            assert src.size(name) == len(data)
            cases = [(0, len(data)), (len(data) - 1, 1), (0, 1), ((1 << 20) - 3, 7), (5, (1 << 20) + 9)]
            for _ in range(60):
                a = rng.randrange(len(data))
                cases.append((a, rng.randint(1, min(3 << 20, len(data) - a))))
            for a, n in cases:
                assert read(src, name, a, n) == data[a : a + n], (name, a, n)
        assert src.stats.retries == 0
    finally:
        src.close()


def test_read_lands_only_in_the_given_view(s3: S3Server, s3_model: Path, shard_bytes: bytes) -> None:
    arena = bytearray(b"\xee" * (3 << 20))
    src = source(s3)
    src.read_into(SHARD, 12345, memoryview(arena)[1000 : 1000 + (2 << 20)])
    src.close()
    assert arena[:1000] == b"\xee" * 1000
    assert arena[1000 + (2 << 20) :] == b"\xee" * (len(arena) - 1000 - (2 << 20))
    assert arena[1000 : 1000 + (2 << 20)] == shard_bytes[12345 : 12345 + (2 << 20)]


def test_concurrent_reads_share_one_client_and_reuse_connections(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    """Like the loader: several threads fill disjoint chunks of one buffer; the pool keeps <= 4 sockets."""
    chunk = 256 << 10
    out = bytearray(len(shard_bytes))
    view = memoryview(out)
    src = source(s3, proxy.endpoint, concurrency=4)
    ranges = [(o, min(chunk, len(out) - o)) for o in range(0, len(out), chunk)]
    random.Random(5).shuffle(ranges)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda r: src.read_into(SHARD, r[0], view[r[0] : r[0] + r[1]]), ranges))
    stats = src.stats
    src.close()
    view.release()
    assert out == shard_bytes
    assert len(gets(proxy)) == len(ranges)
    assert len(proxy.log("HEAD")) == 1  # size and ETag fetched once, then cached
    assert len({e.connection for e in proxy.log()}) <= 4
    assert stats.requests == len(ranges) + 1 and stats.retries == 0 and stats.bytes_read == len(out)


def test_public_read_path_gives_the_same_bytes(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the direct socket read is not safe (e.g. a chunked or encoded body), the source reads
    through botocore's StreamingBody.readinto instead: same bytes, same short-body detection."""
    monkeypatch.setattr(s3mod, "_plain_http_response", lambda body: None)
    src = source(s3, proxy.endpoint)
    rng = random.Random(99)
    for _ in range(10):
        a = rng.randrange(len(shard_bytes))
        n = rng.randint(1, min(3 << 20, len(shard_bytes) - a))
        assert read(src, SHARD, a, n) == shard_bytes[a : a + n]
    proxy.clear()
    proxy.inject(Fault("truncate", after=1_500_000))
    assert read(src, SHARD, OFFSET, LENGTH) == shard_bytes[OFFSET : OFFSET + LENGTH]
    src.close()
    (first, second) = gets(proxy)
    assert first == f"bytes={OFFSET}-{OFFSET + LENGTH - 1}"
    assert second is not None and second.endswith(f"-{OFFSET + LENGTH - 1}")


def test_every_get_pins_the_etag(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint)
    read(src, SHARD, 0, 100)
    src.close()
    etag = s3.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/{SHARD}")["ETag"]
    (entry,) = proxy.log("GET")
    assert entry.headers["if-match"] == etag
    assert entry.range == "bytes=0-99"


def test_read_small(s3: S3Server, s3_model: Path) -> None:
    src = source(s3)
    config = (s3_model / CONFIG_FILE).read_bytes()
    assert src.read_small(CONFIG_FILE, 1 << 20) == config
    with pytest.raises(SourceError, match=rf"{len(config)} bytes, larger than the 10-byte limit") as info:
        src.read_small(CONFIG_FILE, 10)
    assert not isinstance(info.value, SourceNotFound)
    with pytest.raises(SourceNotFound, match=rf"{URL}/manifest.json does not exist"):
        src.read_small("manifest.json", 1 << 20)
    src.close()


def test_range_past_the_end_fails_without_a_request(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    src = source(s3, proxy.endpoint)
    n = len(shard_bytes)
    with pytest.raises(SourceError, match=rf"range \[{n - 5}, {n + 5}\) .* past the end of the {n}-byte"):
        read(src, SHARD, n - 5, 10)
    src.close()
    assert gets(proxy) == []


def test_path_style_addressing(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, path_style=True)
    read(src, SHARD, 0, 8)
    src.close()
    (entry,) = proxy.log("GET")
    assert entry.path.startswith(f"/{BUCKET}/{PREFIX}/{SHARD}")
    assert entry.headers["host"] == f"127.0.0.1:{proxy.port}"
    # Without it, botocore puts the bucket in the host name (no request needed to see the URL).
    vhost = source(s3, "http://localhost:9", path_style=False)
    url = vhost._client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})
    vhost.close()
    assert url.startswith(f"http://{BUCKET}.localhost:9/k?")


# ---------------------------------------------------------------------------------------------------
# Faults: retried, resumed, and eventually correct
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected_ranges"),
    [
        (Fault("status", times=2, status=500, code="InternalError"), ["full", "full", "full"]),
        (Fault("status", status=503, code="SlowDown"), ["full", "full"]),
        (Fault("status", status=429, code="TooManyRequests"), ["full", "full"]),
        (Fault("reset"), ["full", "full"]),
        # Data that arrived just before a RST may be dropped by the kernel: resumed from wherever it got.
        (Fault("reset", after=200_000), ["full", "rest<=200000"]),
        (Fault("truncate", after=1_500_000), ["full", "rest:1500000"]),
        (Fault("truncate", after=0), ["full", "full"]),
        (Fault("whole"), ["full", "full"]),
        (Fault("extend"), ["full", "full"]),
    ],
    ids=lambda v: (
        v.kind + (f"-{v.status}" if v.kind == "status" else f"-{v.after}") if isinstance(v, Fault) else ""
    ),
)
def test_transient_fault_is_retried_and_resumed(
    s3: S3Server,
    s3_model: Path,
    shard_bytes: bytes,
    proxy: FaultProxy,
    fault: Fault,
    expected_ranges: list[str],
) -> None:
    sleeps = Sleeps()
    src = source(s3, proxy.endpoint, sleep=sleeps)
    src.size(SHARD)
    proxy.inject(fault)
    got = read(src, SHARD, OFFSET, LENGTH)
    stats = src.stats
    src.close()
    assert got == shard_bytes[OFFSET : OFFSET + LENGTH]
    last = OFFSET + LENGTH - 1
    seen = gets(proxy)
    assert len(seen) == len(expected_ranges)
    for r, expected in zip(seen, expected_ranges, strict=True):
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r or "")
        assert m is not None and int(m.group(2)) == last, r
        start = int(m.group(1)) - OFFSET
        if expected == "full":
            assert start == 0
        elif expected.startswith("rest:"):
            assert start == int(expected[5:])
        else:
            assert 0 <= start <= int(expected[6:])
    assert stats.retries == len(seen) - 1 == len(sleeps.delays)
    assert stats.bytes_read == LENGTH


def test_slow_response_within_the_timeout_is_waited_for(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    src = source(s3, proxy.endpoint, read_timeout_s=3.0)
    src.size(SHARD)
    proxy.inject(Fault("delay", delay_s=0.3), Fault("delay", delay_s=0.3, after=1000))
    t0 = time.monotonic()
    assert read(src, SHARD, 0, 5000) == shard_bytes[:5000]
    assert read(src, SHARD, 0, 5000) == shard_bytes[:5000]
    assert time.monotonic() - t0 >= 0.6
    assert len(gets(proxy)) == 2 and src.stats.retries == 0
    src.close()


def test_stalled_response_times_out_and_is_retried(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    src = source(s3, proxy.endpoint, read_timeout_s=1.0)
    src.size(SHARD)
    # Stalls before the headers, then part-way through the body: each costs one read timeout. The
    # second resumes after the last whole piece that landed (a timed-out piece may be part-filled).
    proxy.inject(Fault("delay", delay_s=3.0), Fault("delay", delay_s=3.0, after=PIECE_BYTES + 500_000))
    got = read(src, SHARD, OFFSET, LENGTH)
    src.close()
    assert got == shard_bytes[OFFSET : OFFSET + LENGTH]
    last = OFFSET + LENGTH - 1
    assert gets(proxy) == [f"bytes={OFFSET}-{last}"] * 2 + [f"bytes={OFFSET + PIECE_BYTES}-{last}"]


def test_flipped_bytes_are_returned_as_sent(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    """A body of the right length with wrong content cannot be told apart here without a digest: the
    source hands it over and the loader's inline xxh3 against the manifest catches and re-fetches it."""
    src = source(s3, proxy.endpoint)
    proxy.inject(Fault("flip", after=777))
    got = read(src, SHARD, OFFSET, 4096)
    src.close()
    want = shard_bytes[OFFSET : OFFSET + 4096]
    assert [i for i in range(4096) if got[i] != want[i]] == [777]
    assert got[777] == want[777] ^ 0xFF
    assert len(gets(proxy)) == 1


def test_bytes_past_content_length_do_not_leak_into_the_next_range(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    """A server that sends more than its Content-Length leaves junk on the keep-alive connection; the
    source reads exactly the range, and the pool drops the dirty connection instead of parsing the junk
    as the next response."""
    src = source(s3, proxy.endpoint, concurrency=1)
    src.size(SHARD)
    proxy.inject(Fault("overlong", after=5000))
    for a in (0, 4096, 8192):
        assert read(src, SHARD, a, 4096) == shard_bytes[a : a + 4096]
    src.close()
    # urllib3 sees the unread junk when it checks the connection out and opens a new one; were the
    # junk late, the next response would fail to parse and be retried: correct bytes either way.
    conns = [e.connection for e in proxy.log("GET")]
    assert len(conns) == 3 + src.stats.retries and src.stats.retries <= 1
    assert conns[1] != conns[0]


def test_only_the_failed_range_is_fetched_again(
    s3: S3Server, s3_model: Path, shard_bytes: bytes, proxy: FaultProxy
) -> None:
    chunk = 512 << 10
    starts = [i * chunk for i in range(6)]
    src = source(s3, proxy.endpoint)
    src.size(SHARD)
    proxy.inject(Fault("truncate", after=1000, range_start=starts[2]), Fault("reset", range_start=starts[4]))
    out = bytearray(6 * chunk)
    view = memoryview(out)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: src.read_into(SHARD, s, view[s : s + chunk]), starts))
    view.release()
    src.close()
    assert out == shard_bytes[: 6 * chunk]
    seen = gets(proxy)
    for s in starts:
        mine = [r for r in seen if r is not None and r.startswith(f"bytes={s}-")]
        assert len(mine) == (2 if s == starts[4] else 1), (s, seen)
    assert f"bytes={starts[2] + 1000}-{starts[3] - 1}" in seen  # the cut range resumed, alone
    assert len(seen) == 8


def test_backoff_grows_exponentially_with_jitter(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    sleeps = Sleeps()
    src = source(s3, proxy.endpoint, retries=5, backoff_base_s=0.1, backoff_max_s=0.5, sleep=sleeps)
    src.size(SHARD)
    proxy.inject(Fault("status", times=5, status=503))
    read(src, SHARD, 0, 10)
    src.close()
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(sleeps.delays) == 5
    for delay, cap in zip(sleeps.delays, caps, strict=True):
        assert cap / 2 <= delay <= cap


def test_persistent_fault_fails_after_the_configured_attempts(
    s3: S3Server, s3_model: Path, proxy: FaultProxy
) -> None:
    src = source(s3, proxy.endpoint, retries=RETRIES)
    src.size(SHARD)
    proxy.inject(Fault("status", times=None, status=500, code="InternalError"))
    with pytest.raises(SourceError) as info:
        read(src, SHARD, 10, 20)
    src.close()
    message = str(info.value)
    assert f"{URL}/{SHARD} range [10, 30) (20 bytes)" in message
    assert f"failed after {RETRIES + 1} attempts" in message and "HTTP 500 InternalError" in message
    assert not isinstance(info.value, SourceNotFound)
    assert gets(proxy) == ["bytes=10-29"] * (RETRIES + 1)


def test_persistent_short_bodies_fail(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, retries=1)
    src.size(SHARD)
    proxy.inject(Fault("whole", times=None))
    with pytest.raises(SourceError, match=r"failed after 2 attempts; .*HTTP 200 instead of 206"):
        read(src, SHARD, 0, 10)
    proxy.clear()
    proxy.inject(Fault("truncate", after=0, times=None))
    with pytest.raises(SourceError, match=r"failed after 2 attempts; .*body ended after 0 of 10 bytes"):
        read(src, SHARD, 0, 10)
    src.close()


def test_zero_retries_means_one_attempt(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, retries=0)
    src.size(SHARD)
    proxy.inject(Fault("status", status=503))
    with pytest.raises(SourceError, match="failed after 1 attempts"):
        read(src, SHARD, 0, 10)
    src.close()
    assert len(gets(proxy)) == 1


def test_head_and_read_small_are_retried_too(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint)
    proxy.inject(Fault("status", method="HEAD", status=503), Fault("reset", path=CONFIG_FILE))
    assert src.size(SHARD) == (s3_model / SHARD).stat().st_size
    assert src.read_small(CONFIG_FILE, 1 << 20) == (s3_model / CONFIG_FILE).read_bytes()
    src.close()
    assert len(proxy.log("HEAD")) == 2 and len(gets(proxy, CONFIG_FILE)) == 2


# ---------------------------------------------------------------------------------------------------
# Permanent errors fail fast and say what failed
# ---------------------------------------------------------------------------------------------------


def _fails_fast(proxy: FaultProxy, call: Callable[[], object], kind: type[SourceError], pattern: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(kind, match=pattern):
        call()
    assert len(proxy.log()) == 1  # one request, no retries
    assert time.monotonic() - t0 < 2.5  # and no backoff sleep (the callers set it to >= 2.5 s)


def test_missing_key_fails_fast(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, backoff_base_s=5.0)
    _fails_fast(
        proxy,
        lambda: read(src, "model-00009-of-00009.safetensors", 0, 10),
        SourceNotFound,
        rf"{URL}/model-00009-of-00009.safetensors does not exist",
    )
    src.close()


def test_missing_bucket_fails_fast(s3: S3Server, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, url="s3://no-such-bucket/x", backoff_base_s=5.0)
    _fails_fast(
        proxy,
        lambda: src.read_small(CONFIG_FILE, 100),
        SourceNotFound,
        r"bucket 'no-such-bucket' does not exist .*NoSuchBucket",
    )
    src.close()


def test_rejected_credentials_fail_fast(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, access_key=DENIED_KEY, backoff_base_s=5.0)
    _fails_fast(
        proxy,
        lambda: src.read_small(CONFIG_FILE, 1000),
        SourceError,
        rf"access to {URL}/{CONFIG_FILE} denied.*HTTP 403 InvalidAccessKeyId",
    )
    src.close()


def test_forbidden_fails_fast(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, backoff_base_s=5.0)
    proxy.inject(Fault("status", method="HEAD", status=403, code="AccessDenied"))
    _fails_fast(
        proxy,
        lambda: src.size(SHARD),
        SourceError,
        rf"access to {URL}/{SHARD} denied; .*\(HTTP 403 Forbidden\)",
    )
    src.close()


def test_no_credentials_anywhere(
    s3: S3Server, s3_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    src = S3Source(URL, endpoint_url=s3.endpoint, region=REGION, path_style=True)
    with pytest.raises(SourceError, match=r"HEAD of .* no usable AWS credentials"):
        src.size(SHARD)
    src.close()


def test_object_replaced_during_the_load_is_refused(s3: S3Server, s3_model: Path) -> None:
    client = s3.client()
    key = f"{PREFIX}/replaced.safetensors"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"a" * 1000)
    src = source(s3)
    assert read(src, "replaced.safetensors", 0, 10) == b"a" * 10
    client.put_object(Bucket=BUCKET, Key=key, Body=b"b" * 1000)
    # s3rver ignores If-Match (AWS answers 412, tested below); the ETag on the response still tells.
    with pytest.raises(SourceError, match=r"ETag is now .*changed during the load"):
        read(src, "replaced.safetensors", 10, 10)
    client.put_object(Bucket=BUCKET, Key=key, Body=b"c" * 2000)
    with pytest.raises(SourceError, match=r"now 2000 bytes, was 1000"):
        read(src, "replaced.safetensors", 10, 10)
    src.close()


def test_precondition_failed_is_permanent(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    src = source(s3, proxy.endpoint, backoff_base_s=5.0)
    src.size(SHARD)
    proxy.clear()
    proxy.inject(Fault("status", status=412, code="PreconditionFailed"))
    _fails_fast(proxy, lambda: read(src, SHARD, 0, 10), SourceError, r"changed during the load")
    src.close()


# ---------------------------------------------------------------------------------------------------
# Config and the layer map over S3
# ---------------------------------------------------------------------------------------------------


def test_open_source_uses_config_and_the_standard_credential_chain(
    s3: S3Server, s3_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proxy: FaultProxy
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    cfg = parse_config(
        f'[model]\nsource_type = "s3"\nsource_path = "{URL}/"\n'
        f'[model.s3]\nendpoint_url = "{proxy.endpoint}"\nregion = "{REGION}"\npath_style = true\n'
        "[loader]\nconcurrency = 2\nretries = 1\n"
    )
    src = open_source(cfg)
    assert isinstance(src, S3Source) and src.retries == 1 and src.description == URL
    assert src._client.meta.config.max_pool_connections == 2
    proxy.inject(Fault("status", times=None, status=500, method="HEAD"))
    with pytest.raises(SourceError, match="failed after 2 attempts"):
        src.size(SHARD)
    proxy.clear()
    assert src.size(SHARD) == (s3_model / SHARD).stat().st_size
    src.close()
    assert proxy.log()[0].headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")


def test_layout_over_s3_equals_layout_of_the_local_copy(s3: S3Server, s3_model: Path) -> None:
    src = source(s3)
    remote = load_layout_from_source(src)
    src.close()
    local = load_layout(s3_model)
    assert remote.root == URL
    assert (remote.units, remote.files, remote.model_config, remote.num_blocks, remote.tied_embeddings) == (
        local.units,
        local.files,
        local.model_config,
        local.num_blocks,
        local.tied_embeddings,
    )


def test_layout_over_s3_names_the_missing_shard(s3: S3Server, tmp_path: Path) -> None:
    local = make_test_model(tmp_path / "m", layers=1, hidden=32, vocab=64, shards=2)
    client = s3.client()
    upload_dir(client, local, "scratch", "broken")
    client.delete_object(Bucket="scratch", Key="broken/model-00002-of-00002.safetensors")
    src = source(s3, url="s3://scratch/broken")
    with pytest.raises(
        ModelFormatError, match=r"shard 'model-00002-of-00002.safetensors' .* is missing"
    ) as e:
        load_layout_from_source(src)
    src.close()
    assert e.value.source == f"s3://scratch/broken/{INDEX_FILE}"


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b/a/b/") == ("b", "a/b")
    assert parse_s3_url("s3://b") == ("b", "")
    for bad in ("http://b/x", "s3:///x", "b/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


# ---------------------------------------------------------------------------------------------------
# Throughput (numbers printed; the ratio is asserted only by bench/, not on a shared 2-core CI box)
# ---------------------------------------------------------------------------------------------------


def test_throughput_measurement_runs(s3: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    results = measure_throughput(s3, size=32 << 20, chunk=8 << 20, concurrency=4, repeats=1)
    assert set(results) >= {"s3source", "get_object", "download_file", "ratio_best"}
    assert all(v > 0 for v in results.values())
    with capsys.disabled():
        print("\nloopback S3, 32 MiB:", {k: round(v, 2) for k, v in results.items()})


def test_the_server_checks_sigv4_signatures(s3: S3Server, s3_model: Path, proxy: FaultProxy) -> None:
    """The S3 server refuses a request signed with another secret, as S3 does, so every test that
    passes through it proves our client signs correctly (through the proxy too: Host is signed)."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ClientError

    key = f"{PREFIX}/{CONFIG_FILE}"
    good = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert good == (s3_model / CONFIG_FILE).read_bytes()
    forged = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key="not-" + SECRET_KEY, region_name=REGION
    ).client("s3", endpoint_url=s3.endpoint, config=BotoConfig(s3={"addressing_style": "path"}))
    with pytest.raises(ClientError) as info:
        forged.get_object(Bucket=BUCKET, Key=key)
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    # Our source signs right, with query strings and ranges, directly and through the proxy.
    for endpoint in (None, proxy.endpoint):
        src = source(s3, endpoint)
        assert src.read_small(CONFIG_FILE, 1 << 20) == good
        src.close()
