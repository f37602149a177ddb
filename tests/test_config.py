"""Config: every bad input gets one ConfigError with the key path and a clear message; good input
round-trips through to_toml; overrides, defaults and relative paths behave as documented."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest

from butterfly.config import (
    EX_CONFIG,
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    HostPort,
    default_node_id,
    load_config,
    parse_config,
    parse_host_port,
)

MODEL = '[model]\nsource_type = "filesystem"\nsource_path = "/models/llama"\n'
S3 = '[model]\nsource_type = "s3"\n'
HOST_PORT = "host:port (a hostname, IPv4 or [IPv6] address, and a port 1..65535)"
S3_URL = 's3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -; a non-empty prefix), like "s3://models/llama"'
PATH = "a path (relative paths are taken from the config file's directory)"
SECTIONS = "cluster, model, node, api, logging, security, loader, supervisor, validator, engine"
CLUSTER_KEYS = (
    "cluster_name, discovery_method, seed_nodes, quorum_size, dns_srv_name, dns_servers, "
    "consul_address, consul_service, discovery_interval_s, founder, voter_grace_s"
)

# (toml, key, expected, found): the message must read "<key>: expected <expected>, found <found>".
BAD = {
    "unknown section": (
        MODEL + "[clustr]\nquorum_size = 3\n",
        "clustr",
        f"a known section (the sections are: {SECTIONS})",
        'unknown section "clustr" (did you mean "cluster"?)',
    ),
    "key outside any section": (
        "quorum_size = 3\n" + MODEL,
        "quorum_size",
        f"a known section (the sections are: {SECTIONS})",
        'unknown section "quorum_size"',
    ),
    "unknown key": (
        MODEL + "[cluster]\nquorum_sise = 3\n",
        "cluster.quorum_sise",
        f"a known key (the keys of [cluster] are: {CLUSTER_KEYS})",
        'unknown key "quorum_sise" (did you mean "quorum_size"?)',
    ),
    "unknown sub-table key": (
        MODEL + '[model.s3]\naccess_key = "x"\n',
        "model.s3.access_key",
        "a known key (the keys of [model.s3] are: endpoint_url, region, path_style)",
        'unknown key "access_key"',
    ),
    "section is not a table": ("cluster = 3\n" + MODEL, "cluster", "a table [cluster]", "an integer 3"),
    "quorum zero": (MODEL + "[cluster]\nquorum_size = 0\n", "cluster.quorum_size", "an integer >= 1", "0"),
    "kv cache below 1 MiB": (
        MODEL + "[engine]\nkv_cache_bytes = 1000\n",
        "engine.kv_cache_bytes",
        "an integer >= 1048576",
        "1000",
    ),
    "bool is not an int": (
        MODEL + "[cluster]\nquorum_size = true\n",
        "cluster.quorum_size",
        "an integer >= 1",
        "a boolean true",
    ),
    "quoted int": (
        MODEL + '[cluster]\nquorum_size = "3"\n',
        "cluster.quorum_size",
        "an integer >= 1",
        'a string "3"',
    ),
    "float for int": (
        MODEL + "[cluster]\nquorum_size = 1.5\n",
        "cluster.quorum_size",
        "an integer >= 1",
        "a float 1.5",
    ),
    "discovery enum": (
        MODEL + '[cluster]\ndiscovery_method = "gossip"\n',
        "cluster.discovery_method",
        'one of "static", "dns", "consul"',
        '"gossip"',
    ),
    "seeds not an array": (
        MODEL + '[cluster]\nseed_nodes = "a:1"\n',
        "cluster.seed_nodes",
        f"an array of {HOST_PORT}",
        'a string "a:1"',
    ),
    "seed without port": (
        MODEL + '[cluster]\nseed_nodes = ["a:1", "host"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 2: "host" (the port is missing)',
    ),
    "seed port 0": (
        MODEL + '[cluster]\nseed_nodes = ["h:0"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "h:0" (the port 0 is not a number from 1 to 65535)',
    ),
    "seed port too big": (
        MODEL + '[cluster]\nseed_nodes = ["h:65536"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "h:65536" (the port 65536 is not a number from 1 to 65535)',
    ),
    "seed IPv6 without brackets": (
        MODEL + '[cluster]\nseed_nodes = ["::1:7000"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "::1:7000" (an IPv6 address must be written in brackets, like [::1]:7000)',
    ),
    "seed bad IPv6": (
        MODEL + '[cluster]\nseed_nodes = ["[::zz]:7000"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "[::zz]:7000" (::zz is not an IPv6 address)',
    ),
    "seed bad IPv4": (
        MODEL + '[cluster]\nseed_nodes = ["999.1.1.1:7000"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "999.1.1.1:7000" (999.1.1.1 is not a valid IPv4 address)',
    ),
    "seed bad hostname": (
        MODEL + '[cluster]\nseed_nodes = ["bad_host:7000"]\n',
        "cluster.seed_nodes",
        HOST_PORT,
        'entry 1: "bad_host:7000" (bad_host is not a valid hostname)',
    ),
    "seed not a string": (
        MODEL + "[cluster]\nseed_nodes = [7000]\n",
        "cluster.seed_nodes",
        HOST_PORT,
        "entry 1: an integer 7000",
    ),
    "seed twice": (
        MODEL + '[cluster]\nseed_nodes = ["a:1", "a:1"]\n',
        "cluster.seed_nodes",
        "no duplicate entries",
        'entry 2: "a:1" again',
    ),
    "cluster name": (
        MODEL + '[cluster]\ncluster_name = "My Cluster"\n',
        "cluster.cluster_name",
        "1-63 of a-z 0-9 -",
        '"My Cluster"',
    ),
    "empty cluster name": (
        MODEL + '[cluster]\ncluster_name = ""\n',
        "cluster.cluster_name",
        "1-63 of a-z 0-9 -",
        '""',
    ),
    "dns without srv name": (
        MODEL + '[cluster]\ndiscovery_method = "dns"\n',
        "cluster.dns_srv_name",
        'an SRV name like "_butterfly._tcp.example.com" (discovery_method is "dns")',
        "nothing",
    ),
    "srv name shape": (
        MODEL + '[cluster]\ndns_srv_name = "butterfly.example.com"\n',
        "cluster.dns_srv_name",
        'an SRV name like "_butterfly._tcp.example.com"',
        '"butterfly.example.com"',
    ),
    "dns server by name": (
        MODEL + '[cluster]\ndns_servers = ["dns.example.com"]\n',
        "cluster.dns_servers",
        "ip or ip:port (port 53 when left out; IPv6 with a port as [ip]:port)",
        'entry 1: "dns.example.com"',
    ),
    "consul address without scheme": (
        MODEL + '[cluster]\nconsul_address = "127.0.0.1:8500"\n',
        "cluster.consul_address",
        "an http:// or https:// URL with a host",
        '"127.0.0.1:8500"',
    ),
    "interval zero": (
        MODEL + "[cluster]\ndiscovery_interval_s = 0\n",
        "cluster.discovery_interval_s",
        "a number > 0",
        "0",
    ),
    "interval nan": (
        MODEL + "[cluster]\ndiscovery_interval_s = nan\n",
        "cluster.discovery_interval_s",
        "a number > 0",
        "nan",
    ),
    "no model section": (
        "[cluster]\nquorum_size = 1\n",
        "model.source_type",
        'one of "s3", "filesystem"',
        "nothing (the key is required)",
    ),
    "no source path": (
        S3,
        "model.source_path",
        "an s3://bucket/prefix URL or a directory, as source_type says",
        "nothing (the key is required)",
    ),
    "source type enum": (
        '[model]\nsource_type = "http"\nsource_path = "x"\n',
        "model.source_type",
        'one of "s3", "filesystem"',
        '"http"',
    ),
    "s3 path without scheme": (
        S3 + 'source_path = "ml-models/llama"\n',
        "model.source_path",
        S3_URL,
        '"ml-models/llama"',
    ),
    "s3 path without prefix": (
        S3 + 'source_path = "s3://ml-models"\n',
        "model.source_path",
        S3_URL,
        '"s3://ml-models"',
    ),
    "s3 path with empty prefix": (
        S3 + 'source_path = "s3://ml-models/"\n',
        "model.source_path",
        S3_URL,
        '"s3://ml-models/"',
    ),
    "s3 bucket name": (
        S3 + 'source_path = "s3://Bad_Bucket/x"\n',
        "model.source_path",
        S3_URL,
        '"s3://Bad_Bucket/x"',
    ),
    "filesystem source with an s3 url": (
        '[model]\nsource_type = "filesystem"\nsource_path = "s3://a-b/c"\n',
        "model.source_path",
        'a directory (source_type is "filesystem")',
        '"s3://a-b/c"',
    ),
    "manifest s3 url shape": (
        MODEL + 'manifest_path = "s3://bucket"\n',
        "model.manifest_path",
        S3_URL,
        '"s3://bucket"',
    ),
    "endpoint scheme": (
        MODEL + '[model.s3]\nendpoint_url = "ftp://minio:9000"\n',
        "model.s3.endpoint_url",
        "an http:// or https:// URL with a host",
        '"ftp://minio:9000"',
    ),
    "path style as string": (
        MODEL + '[model.s3]\npath_style = "yes"\n',
        "model.s3.path_style",
        "true or false",
        'a string "yes"',
    ),
    "expected root not hex": (
        MODEL + 'expected_root = "' + "A" * 64 + '"\n',
        "model.expected_root",
        "the 64 lowercase hex digits of a manifest's root",
        '"' + "A" * 64 + '"',
    ),
    "expected root too short": (
        MODEL + 'expected_root = "abc"\n',
        "model.expected_root",
        "the 64 lowercase hex digits of a manifest's root",
        '"abc"',
    ),
    "public key not base64": (
        MODEL + 'manifest_public_key = "not a key!"\n',
        "model.manifest_public_key",
        "an Ed25519 public key in base64 (the line `butterfly-admin manifest keygen` prints)",
        '"not a key!" (not base64)',
    ),
    "public key of the wrong length": (
        MODEL + 'manifest_public_key = "AAAA"\n',
        "model.manifest_public_key",
        "an Ed25519 public key in base64 (the line `butterfly-admin manifest keygen` prints)",
        '"AAAA" (3 bytes, an Ed25519 public key is 32)',
    ),
    "node id characters": (
        MODEL + '[node]\nid = "node a"\n',
        "node.id",
        "1-63 of A-Z a-z 0-9 . _ -",
        '"node a"',
    ),
    "node id too long": (
        MODEL + '[node]\nid = "' + "x" * 64 + '"\n',
        "node.id",
        "1-63 of A-Z a-z 0-9 . _ -",
        '"' + "x" * 64 + '"',
    ),
    "role enum": (
        MODEL + '[node]\nrole = "leader"\n',
        "node.role",
        'one of "worker", "coordinator"',
        '"leader"',
    ),
    "bind without port": (
        MODEL + '[node]\nbind_address = "0.0.0.0"\n',
        "node.bind_address",
        HOST_PORT,
        '"0.0.0.0" (the port is missing)',
    ),
    "advertise a wildcard": (
        MODEL + '[node]\nadvertise_address = "0.0.0.0:7000"\n',
        "node.advertise_address",
        "an address peers can reach (not a wildcard)",
        '"0.0.0.0:7000"',
    ),
    "gpu enum": (MODEL + '[node]\ngpu = "on"\n', "node.gpu", 'one of "auto", "off", "required"', '"on"'),
    "negative reserve": (
        MODEL + "[node]\nmemory_reserve_bytes = -1\n",
        "node.memory_reserve_bytes",
        "an integer >= 0",
        "-1",
    ),
    "path as int": (MODEL + "[node]\nstate_dir = 5\n", "node.state_dir", PATH, "an integer 5"),
    "empty path": (MODEL + '[node]\nstate_dir = ""\n', "node.state_dir", PATH, '""'),
    "api on the cluster port": (
        MODEL + '[api]\nlisten = "127.0.0.1:7000"\n',
        "api.listen",
        "an address apart from node.bind_address (0.0.0.0:7000)",
        '"127.0.0.1:7000"',
    ),
    "log level enum": (
        MODEL + '[logging]\nlevel = "trace"\n',
        "logging.level",
        'one of "debug", "info", "warning", "error"',
        '"trace"',
    ),
    "log format enum": (
        MODEL + '[logging]\nformat = "json"\n',
        "logging.format",
        'one of "auto", "text", "journal"',
        '"json"',
    ),
    "tls cert without key": (
        MODEL + '[security]\ntls_cert = "/etc/b/c.pem"\n',
        "security.tls_key",
        "a path (tls_cert is set; they go together)",
        "nothing",
    ),
    "tls key without cert": (
        MODEL + '[security]\ntls_key = "/etc/b/k.pem"\n',
        "security.tls_cert",
        "a path (tls_key is set; they go together)",
        "nothing",
    ),
    "tls without the cluster's ca": (
        MODEL + '[security]\ntls_cert = "/etc/b/c.pem"\ntls_key = "/etc/b/k.pem"\n',
        "security.tls_ca",
        "a path to the cluster's own CA certificate (tls_cert is set; peers are checked against it, "
        "never against the system store)",
        "nothing",
    ),
    "tls ca alone": (
        MODEL + '[security]\ntls_ca = "/etc/b/ca.pem"\n',
        "security.tls_cert",
        "a path (tls_ca is set; TLS is mutual)",
        "nothing",
    ),
    "chunk not a power of two": (
        MODEL + "[loader]\nchunk_bytes = 1000000\n",
        "loader.chunk_bytes",
        "a power of two from 65536 (64 KiB) to 268435456 (256 MiB)",
        "1000000",
    ),
    "chunk too small": (
        MODEL + "[loader]\nchunk_bytes = 32768\n",
        "loader.chunk_bytes",
        "a power of two from 65536 (64 KiB) to 268435456 (256 MiB)",
        "32768",
    ),
    "chunk too big": (
        MODEL + "[loader]\nchunk_bytes = 536870912\n",
        "loader.chunk_bytes",
        "a power of two from 65536 (64 KiB) to 268435456 (256 MiB)",
        "536870912",
    ),
    "concurrency": (
        MODEL + "[loader]\nconcurrency = 65\n",
        "loader.concurrency",
        "an integer from 1 to 64",
        "65",
    ),
    "retries": (MODEL + "[loader]\nretries = 11\n", "loader.retries", "an integer from 0 to 10", "11"),
    "stop timeout zero": (
        MODEL + "[supervisor]\nstop_timeout_s = 0\n",
        "supervisor.stop_timeout_s",
        "a number > 0",
        "0",
    ),
    "negative restart limit": (
        MODEL + "[supervisor]\nrestart_limit = -1\n",
        "supervisor.restart_limit",
        "an integer >= 0",
        "-1",
    ),
    "negative backoff": (
        MODEL + "[supervisor]\nrestart_backoff_s = -0.5\n",
        "supervisor.restart_backoff_s",
        "a number >= 0",
        "-0.5",
    ),
    "scrub interval zero": (
        MODEL + "[validator]\nscrub_interval_s = 0\n",
        "validator.scrub_interval_s",
        "a number > 0",
        "0",
    ),
    "scrub cpu over a core": (
        MODEL + "[validator]\nscrub_cpu_percent = 150\n",
        "validator.scrub_cpu_percent",
        "a number above 0 to 100",
        "150",
    ),
    "scrub cpu zero": (
        MODEL + "[validator]\nscrub_cpu_percent = 0\n",
        "validator.scrub_cpu_percent",
        "a number above 0 to 100",
        "0",
    ),
    "scrub as a string": (
        MODEL + '[validator]\nscrub = "on"\n',
        "validator.scrub",
        "true or false",
        'a string "on"',
    ),
    "duration with a unit": (
        MODEL + '[supervisor]\nheartbeat_timeout_s = "10s"\n',
        "supervisor.heartbeat_timeout_s",
        "a number > 0",
        'a string "10s"',
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_names_key_and_says_what_was_expected(name: str) -> None:
    text, key, expected, found = BAD[name]
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="/etc/butterfly/node.toml")
    err = caught.value
    assert (err.path, err.key, err.expected, err.found) == ("/etc/butterfly/node.toml", key, expected, found)
    assert str(err) == f"config error in /etc/butterfly/node.toml: {key}: expected {expected}, found {found}"


def test_message_matches_the_documented_shape() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MODEL + "[cluster]\nquorum_size = 0\n", source="/etc/butterfly/node.toml")
    assert str(caught.value) == (
        "config error in /etc/butterfly/node.toml: cluster.quorum_size: expected an integer >= 1, found 0"
    )
    assert EX_CONFIG == 78


def test_toml_syntax_error_reports_line_and_column() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MODEL + "[cluster]\nquorum_size = = 3\n", source="node.toml")
    err = caught.value
    assert err.key is None
    assert (err.line, err.column) == (5, 15)
    assert str(err).startswith("config error in node.toml: expected valid TOML, found a syntax error: ")
    assert "(at line 5, column 15)" in str(err)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == (
        f"config error in {missing}: expected a readable config file, found No such file or directory"
    )


def test_directory_and_non_utf8_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a readable config file"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[cluster]\ncluster_name = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert (caught.value.expected, caught.value.found) == ("UTF-8 text", "byte 0xe9 at offset 29")


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a.example.com")
    config = parse_config(MODEL)
    assert config.cluster.cluster_name == "butterfly"
    assert config.cluster.discovery_method == "static"
    assert config.cluster.seed_nodes == ()
    assert config.cluster.quorum_size == 1
    assert config.cluster.consul_address == "http://127.0.0.1:8500"
    assert config.cluster.discovery_interval_s == 5.0
    assert config.cluster.founder is None and config.cluster.voter_grace_s == 30.0
    assert config.model.manifest_path is None
    assert config.model.s3.path_style is False
    assert config.node.role == "worker"
    assert config.node.bind_address == HostPort("0.0.0.0", 7000)
    assert config.node.id == default_node_id("node-a.example.com", HostPort("0.0.0.0", 7000))
    assert config.node.cache_dir == Path("/var/butterfly/models")
    assert config.node.state_dir == Path("/var/lib/butterfly")
    assert config.node.gpu == "auto"
    assert config.node.memory_reserve_bytes == 1 << 30
    assert config.api.listen == HostPort("127.0.0.1", 8080)
    assert (config.logging.level, config.logging.file, config.logging.format) == ("info", None, "auto")
    assert config.security.secret_file == Path("/etc/butterfly/cluster.key")
    assert config.security.tls_cert is None
    assert (config.loader.chunk_bytes, config.loader.concurrency, config.loader.retries) == (8 << 20, 4, 3)
    sup = config.supervisor
    assert (sup.stop_timeout_s, sup.restart_limit, sup.restart_window_s) == (10.0, 3, 60.0)
    assert (sup.restart_backoff_s, sup.heartbeat_timeout_s) == (0.5, 10.0)


def test_default_node_id_is_short_hostname_and_stable_hex() -> None:
    bind = HostPort("0.0.0.0", 7000)
    node_id = default_node_id("node-a.example.com", bind)
    assert node_id.startswith("node-a-") and len(node_id) == len("node-a-") + 4
    assert int(node_id[-4:], 16) >= 0
    assert default_node_id("node-a.example.com", bind) == node_id
    # Two nodes on one machine differ by their bind address.
    assert default_node_id("node-a.example.com", HostPort("0.0.0.0", 7001)) != node_id
    assert default_node_id("node-b.example.com", bind) != node_id
    assert default_node_id("", bind).startswith("node-")


def test_membership_keys_are_validated() -> None:
    config = parse_config(MODEL + '[cluster]\nfounder = "10.0.0.1:7000"\nvoter_grace_s = 5\n')
    assert config.cluster.founder == HostPort("10.0.0.1", 7000) and config.cluster.voter_grace_s == 5.0
    with pytest.raises(ConfigError) as caught:
        parse_config(MODEL + "[cluster]\nvoter_grace_s = 0\n")
    assert caught.value.key == "cluster.voter_grace_s"
    with pytest.raises(ConfigError) as caught:
        parse_config(MODEL + '[cluster]\nfounder = "nohost"\n')
    assert caught.value.key == "cluster.founder" and caught.value.expected == HOST_PORT


def test_integers_are_accepted_for_float_keys() -> None:
    config = parse_config(MODEL + "[supervisor]\nstop_timeout_s = 30\n")
    assert config.supervisor.stop_timeout_s == 30.0
    assert isinstance(config.supervisor.stop_timeout_s, float)


def full_config_text() -> str:
    return """
[cluster]
cluster_name = "prod-1"
discovery_method = "dns"
seed_nodes = ["coord.example.com:7000", "10.0.1.11:7000", "[2001:db8::1]:7001"]
quorum_size = 3
dns_srv_name = "_butterfly._tcp.example.com"
dns_servers = ["10.0.0.53", "10.0.0.54:5353", "2001:db8::53", "[2001:db8::54]:5353"]
consul_address = "https://consul.example.com:8501"
consul_service = "butterfly-prod"
discovery_interval_s = 2.5

[model]
source_type = "s3"
source_path = "s3://ml-models/llama-70b-v2/"
manifest_path = "s3://ml-models/llama-70b-v2/manifest.json"

[model.s3]
endpoint_url = "http://minio.internal:9000"
region = "us-east-1"
path_style = true

[node]
id = "node-a-7f3d"
role = "coordinator"
bind_address = "[::]:7000"
advertise_address = "node-a.example.com:7000"
state_dir = "/srv/butterfly/state"
cache_dir = "/srv/butterfly/models"
gpu = "required"
memory_reserve_bytes = 0

[api]
listen = "0.0.0.0:8080"

[logging]
level = "debug"
file = "/var/log/butterfly/node.log"
format = "journal"

[security]
secret_file = "/etc/butterfly/cluster.key"
tls_cert = "/etc/butterfly/tls/node.pem"
tls_key = "/etc/butterfly/tls/node.key"
tls_ca = "/etc/butterfly/tls/ca.pem"

[loader]
chunk_bytes = 16777216
concurrency = 16
retries = 0

[supervisor]
stop_timeout_s = 20
restart_limit = 0
restart_window_s = 120.0
restart_backoff_s = 0
heartbeat_timeout_s = 5.0
"""


def test_full_config_values() -> None:
    config = parse_config(full_config_text())
    assert config.cluster.seed_nodes == (
        HostPort("coord.example.com", 7000),
        HostPort("10.0.1.11", 7000),
        HostPort("2001:db8::1", 7001),
    )
    assert config.cluster.dns_servers == (
        HostPort("10.0.0.53", 53),
        HostPort("10.0.0.54", 5353),
        HostPort("2001:db8::53", 53),
        HostPort("2001:db8::54", 5353),
    )
    # A trailing slash names the same prefix.
    assert config.model.source_path == "s3://ml-models/llama-70b-v2"
    assert config.node.bind_address == HostPort("::", 7000)
    assert str(config.node.bind_address) == "[::]:7000"
    assert config.model.s3.endpoint_url == "http://minio.internal:9000"
    assert config.security.tls_ca == Path("/etc/butterfly/tls/ca.pem")


@pytest.mark.parametrize("text", [MODEL, full_config_text()], ids=["minimal", "full"])
def test_to_toml_round_trips_to_an_equal_config(text: str) -> None:
    config = parse_config(text, source="a.toml")
    written = config.to_toml()
    again = parse_config(written, source="b.toml", base_dir=Path("/elsewhere"))
    assert again == config
    assert again.to_toml().splitlines()[1:] == written.splitlines()[1:]
    # Complete: every key of every section is written, set or not.
    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        assert f"[{section.name}]" in written
        for key in dataclasses.fields(getattr(config, section.name)):
            if key.name != "s3":
                assert f"{key.name} = " in written or f"# {key.name} is not set" in written


def test_to_toml_escapes_strings() -> None:
    config = parse_config(MODEL + '[node]\nstate_dir = "/srv/we\\"ird\\\\dir\\u0001"\n')
    assert parse_config(config.to_toml()).node.state_dir == Path('/srv/we"ird\\dir\x01')


def test_overrides_replace_role_and_seed_nodes() -> None:
    config = parse_config(MODEL + '[cluster]\nseed_nodes = ["10.0.1.10:7000"]\n')
    changed = config.with_overrides(role="coordinator", seed_nodes=["coord:7000", "[::1]:7001"])
    assert changed.node.role == "coordinator"
    assert changed.cluster.seed_nodes == (HostPort("coord", 7000), HostPort("::1", 7001))
    assert config.node.role == "worker"  # the original is untouched (frozen)
    assert config.with_overrides() == config
    assert config.with_overrides(seed_nodes=[]).cluster.seed_nodes == ()


def test_override_errors_name_the_flag() -> None:
    config = parse_config(MODEL, source="/etc/butterfly/node.toml")
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(seed_nodes=["coord"])
    assert caught.value.key == "--seed-nodes"
    assert str(caught.value) == (
        f"config error in /etc/butterfly/node.toml: --seed-nodes: expected {HOST_PORT}, "
        'found entry 1: "coord" (the port is missing)'
    )
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(role="leader")
    assert (caught.value.key, caught.value.found) == ("--role", '"leader"')


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "node.toml").write_text(
        '[model]\nsource_type = "filesystem"\nsource_path = "models/llama"\nmanifest_path = "m.json"\n'
        '[node]\ncache_dir = "../cache"\nstate_dir = "/abs/state"\n'
        '[logging]\nfile = "logs/node.log"\n'
        '[security]\nsecret_file = "cluster.key"\n'
    )
    config = load_config(conf_dir / "node.toml")
    assert config.model.source_path == str(conf_dir / "models/llama")
    assert config.model.manifest_path == str(conf_dir / "m.json")
    assert config.node.cache_dir == conf_dir / "../cache"
    assert config.node.state_dir == Path("/abs/state")
    assert config.logging.file == conf_dir / "logs/node.log"
    assert config.security.secret_file == conf_dir / "cluster.key"
    assert config.source == str(conf_dir / "node.toml")


def test_parse_config_resolves_against_base_dir_or_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[model]\nsource_type = "filesystem"\nsource_path = "models"\n'
    assert parse_config(text, base_dir=Path("/opt/b")).model.source_path == "/opt/b/models"
    monkeypatch.chdir(tmp_path)
    assert parse_config(text).model.source_path == str(tmp_path / "models")


@pytest.mark.parametrize("name", ["coord.toml", "worker.toml"])
def test_examples_match_the_seed(name: str) -> None:
    config = load_config(Path(__file__).parent.parent / "examples" / name)
    assert config.cluster.cluster_name == "my-cluster"
    assert config.cluster.seed_nodes == (HostPort("10.0.1.10", 7000), HostPort("10.0.1.11", 7000))
    assert config.cluster.quorum_size == 3
    assert (config.model.source_type, config.model.source_path) == ("s3", "s3://ml-models/llama-70b-v2")
    assert config.node.role == ("coordinator" if name == "coord.toml" else "worker")
    assert config.node.bind_address == HostPort("0.0.0.0", 7000)
    assert config.node.cache_dir == Path("/var/butterfly/models")
    assert config.logging.file == Path("/var/log/butterfly/node.log")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("coord:7000", ("coord", 7000)),
        ("node-a.example.com:1", ("node-a.example.com", 1)),
        ("10.0.1.10:65535", ("10.0.1.10", 65535)),
        ("[::1]:7000", ("::1", 7000)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_parse_host_port_accepts(text: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(text) == parsed
    assert str(parse_host_port(text)) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("coord", "the port is missing"),
        ("coord:", "the port (empty) is not a number from 1 to 65535"),
        (":7000", "the host is empty"),
        ("coord:+80", "the port +80 is not a number from 1 to 65535"),
        ("coord:007000", "the port 007000 is not a number from 1 to 65535"),
        ("-bad.example:1", "-bad.example is not a valid hostname"),
        ("[::1]", "the port is missing"),
        ("[::1:7000", "'[' opens an IPv6 address but there is no ']'"),
        ("1.2.3:80", "1.2.3 is not a valid IPv4 address"),
    ],
)
def test_parse_host_port_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_host_port(text)
    assert str(caught.value) == reason


def test_config_is_frozen() -> None:
    config = parse_config(MODEL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.role = "coordinator"  # type: ignore[misc]
    assert isinstance(config, Config)


def test_a_fifo_or_endless_device_as_config_is_refused_at_once(tmp_path: Path) -> None:
    # A mistyped --config naming a FIFO used to wait for a writer for ever (node, --check-config and
    # every admin command); /dev/zero used to be read until MemoryError, a traceback and exit 1.
    fifo = tmp_path / "node.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(fifo)
    assert time.monotonic() - started < 5
    assert str(caught.value) == (
        f"config error in {fifo}: expected a readable config file, "
        "found not a regular file (a FIFO, socket or device)"
    )
    with pytest.raises(ConfigError, match="found not a regular file"):
        load_config("/dev/zero")


def test_a_config_file_over_the_size_limit_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.write(MODEL.encode())
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: the NULs past the text are never read as TOML
    with pytest.raises(ConfigError) as caught:
        load_config(huge)
    assert str(caught.value) == (
        f"config error in {huge}: expected a config file of at most 1 MiB, found a larger file"
    )


def test_seed_nodes_flag_of_commas_only_is_refused_not_read_as_no_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--seed-nodes "$A,$B"` with both variables unset is a list that went missing: a node started
    with it would wait alone instead of saying so. An empty --seed-nodes "" still means no seeds, and
    a trailing comma is forgiven."""
    from butterfly.cli.node import build_parser, effective_config, main

    conf = tmp_path / "node.toml"
    conf.write_text(MODEL + '[cluster]\nseed_nodes = ["10.0.1.10:7000"]\n')
    assert main(["--config", str(conf), "--check-config", "--seed-nodes", ",,,"]) == 78
    err = capsys.readouterr().err
    assert f"config error in {conf}: --seed-nodes: expected host:port,..., found ',,,'" in err

    def seeds(flag: str) -> tuple[HostPort, ...]:
        return effective_config(
            build_parser().parse_args(["--config", str(conf), "--seed-nodes", flag])
        ).cluster.seed_nodes

    assert seeds("") == ()
    assert seeds("10.0.1.11:7000,") == (HostPort("10.0.1.11", 7000),)
