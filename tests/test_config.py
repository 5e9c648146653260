"""The one typed configuration (fabric/config/, docs/config.md): layers, errors, names, the CLI, and a real fabric.

Unit tests call :func:`fabric.config.load_config` with an explicit environment and
state directory, so the machine's own ``FABRIC_*`` variables and state never leak in;
the CLI tests run ``python -m fabric.cli config ...`` as a subprocess.  Those need no
nats-server and are marked ``unit``; the last test (``slow``) starts a real fabric
(``fabric up -d``) whose allocator and gpu-monitor must run with what
``<state-dir>/fabric.toml`` says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.config import (
    DEPRECATED_ENV,
    KEYS,
    ConfigError,
    FabricConfig,
    PoolConfig,
    TelemetryConfig,
    env_name,
    load_config,
    validate_file,
)
from fabric.config.keys import NOT_CONFIG_ENV, SECTIONS, section_prefixes
from fabric.service import ServiceSettings
from tests._nats import env_with_repo

MiB = 1 << 20


def _load(state_dir: Path, environ: dict[str, str] | None = None, config_file: Path | None = None,
          **flags: tuple[str, Any]) -> Any:
    flags.setdefault("state_dir", ("--state-dir", str(state_dir)))
    return load_config(config_file=config_file, environ=environ or {}, flags=flags)


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment for a subprocess, without any FABRIC_* configuration of its own."""
    env = {k: v for k, v in env_with_repo().items()
           if not (k.startswith("FABRIC_") and k not in NOT_CONFIG_ENV) and k != "FABRIC_CREDENTIALS"}
    env.update(extra)
    return env


def _issues(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str | None, str]:
    return {issue.path: f"{issue.message} ({issue.source})" for issue in exc.value.issues}


# -- layers ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_defaults_are_what_fabric_did_before(tmp_path: Path) -> None:
    loaded = _load(tmp_path)
    cfg = loaded.config
    assert loaded.file is None and set(loaded.sources.values()) == {"default", "flag --state-dir"}
    assert cfg.mem.capacity is None and cfg.mem.quota == 0 and cfg.mem.quotas == {}
    assert (cfg.telemetry.interval_s, cfg.telemetry.node_ttl_s) == (1.0, 5.0)
    assert (cfg.pool.reader_spin_us, cfg.pool.worker_spin_us) == (250.0, 1000.0)
    assert (cfg.nats.host, cfg.nats.port, cfg.up.ready_timeout_s, cfg.up.grace_s) == ("127.0.0.1", 4222, 30.0, 10.0)
    assert cfg.log_level == "info"


@pytest.mark.unit
def test_each_layer_beats_the_one_before(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("node = 'from-file'\nlog_level = 'debug'\n"
                                          "[mem]\ncapacity = 1000\nquota = 7\n")
    env = {"FABRIC_MEM_CAPACITY": "2000", "FABRIC_NODE": "from-env"}
    loaded = _load(tmp_path, env, node=("--node", "from-flag"))
    cfg, src = loaded.config, loaded.sources
    file_label = f"file {tmp_path / 'fabric.toml'}"
    assert loaded.file == tmp_path / "fabric.toml"
    assert (cfg.log_level, src["log_level"]) == ("debug", file_label)  # file > default
    assert (cfg.mem.quota, src["mem.quota"]) == (7, file_label)
    assert (cfg.mem.capacity, src["mem.capacity"]) == (2000, "env FABRIC_MEM_CAPACITY")  # env > file
    assert (cfg.node, src["node"]) == ("from-flag", "flag --node")  # flag > env > file
    assert src["telemetry.interval_s"] == "default"


@pytest.mark.unit
def test_config_flag_replaces_the_state_dir_file(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("[mem]\ncapacity = 1000\n")
    other = tmp_path / "other.toml"
    other.write_text("[mem]\nquota = 5\n")
    loaded = _load(tmp_path, config_file=other)
    assert loaded.file == other
    assert loaded.config.mem.capacity is None and loaded.config.mem.quota == 5
    # the state directory named by FABRIC_STATE_DIR is where the file is looked for without the flag
    env_loaded = load_config(environ={"FABRIC_STATE_DIR": str(tmp_path)})
    assert env_loaded.config.mem.capacity == 1000
    with pytest.raises(ConfigError, match="cannot read the file"):
        _load(tmp_path, config_file=tmp_path / "missing.toml")


@pytest.mark.unit
def test_environment_forms_of_lists_and_tables(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("[mem.quotas]\nalice = 1\n[up]\nservices = ['allocator']\n")
    assert _load(tmp_path).config.mem.quotas == {"alice": 1}
    cfg = _load(tmp_path, {"FABRIC_MEM_QUOTAS": "alice=1024, bob=0",
                           "FABRIC_UP_SERVICES": "allocator, spawner", "FABRIC_LOG_LEVEL": "DEBUG"}).config
    assert cfg.mem.quotas == {"alice": 1024, "bob": 0}
    assert cfg.up.services == ["allocator", "spawner"]
    assert cfg.log_level == "DEBUG"  # any case, as FABRIC_LOG_LEVEL always took
    assert _load(tmp_path, {"FABRIC_MEM_CAPACITY": ""}).config.mem.capacity is None  # empty = unset


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_every_file_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n"
                   "[mem]\ncapacity = 'big'\ncapactiy = 1\nquotas = {alice = -1, bob = 2}\n"
                   "[nats]\nport = 70000\n"
                   "[telemetry]\ninterval_s = 2.0\nnode_ttl_s = 3.0\n")
    issues = {i.path: i.message for i in validate_file(bad)}
    assert issues == {
        "colour": "unknown key",
        "mem.capacity": "expected int, got str",
        "mem.capactiy": "unknown key; did you mean 'mem.capacity'?",
        "mem.quotas.alice": "expected int >= 0, got -1",
        "nats.port": "expected int <= 65535, got 70000",
        "telemetry": "telemetry.node_ttl_s (3 s) must be at least twice the heartbeat interval "
                     "telemetry.interval_s (2 s)",
    }
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, config_file=bad)
    assert len(exc.value.issues) == 6
    assert all(issue.source == f"file {bad}" for issue in exc.value.issues)
    assert "mem.capacity: expected int, got str (file " in str(exc.value)


@pytest.mark.unit
def test_wrong_types_from_the_environment_and_a_section_that_is_no_table(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("mem = 3\n")
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, {"FABRIC_TELEMETRY_INTERVAL_S": "soon", "FABRIC_NATS_PORT": "-1",
                         "FABRIC_NODE": "a.b", "FABRIC_MEM_QUOTAS": "alice"})
    issues = _issues(exc)
    assert issues["mem"] == f"expected a table, got int (file {tmp_path / 'fabric.toml'})"
    assert issues["telemetry.interval_s"] == "expected float, got str (env FABRIC_TELEMETRY_INTERVAL_S)"
    assert issues["nats.port"] == "expected int >= 0, got -1 (env FABRIC_NATS_PORT)"
    assert "use 1 to 64 letters" in issues["node"] and issues["node"].endswith("(env FABRIC_NODE)")
    assert issues["mem.quotas"] == "expected owner=bytes, got 'alice' (env FABRIC_MEM_QUOTAS)"


@pytest.mark.unit
def test_cross_field_rule_names_both_keys_and_where_they_came_from(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("[telemetry]\nnode_ttl_s = 3\n")
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, {"FABRIC_TELEMETRY_INTERVAL_S": "2"})
    [issue] = exc.value.issues
    assert issue.path == "telemetry" and "twice" in issue.message
    assert issue.source == f"env FABRIC_TELEMETRY_INTERVAL_S, file {tmp_path / 'fabric.toml'}"
    # the rule holds for a section made in code too
    with pytest.raises(ValueError, match="twice the heartbeat interval"):
        TelemetryConfig(interval_s=1.0, node_ttl_s=1.5)


@pytest.mark.unit
def test_a_typo_under_a_section_prefix_names_the_closest_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, {"FABRIC_MEM_CAPACTY": "1", "FABRIC_TELEMETRY_INTERVAL": "1"})
    assert len(exc.value.issues) == 2
    text = str(exc.value)
    assert "did you mean FABRIC_MEM_CAPACITY? (env FABRIC_MEM_CAPACTY)" in text
    assert "did you mean FABRIC_TELEMETRY_INTERVAL_S? (env FABRIC_TELEMETRY_INTERVAL)" in text


@pytest.mark.unit
def test_other_fabric_variables_are_not_configuration(tmp_path: Path) -> None:
    env = {name: "1" for name in NOT_CONFIG_ENV}
    env.update({"FABRIC_SPAWN_SOMETHING": "x", "FABRIC_IMPORT": "y"})
    assert _load(tmp_path, env).config == _load(tmp_path).config


@pytest.mark.unit
def test_renamed_variables_still_work_with_a_warning(tmp_path: Path) -> None:
    loaded = _load(tmp_path, {"FABRIC_NODE_TTL_S": "9", "FABRIC_WORKER_SPIN_US": "5"})
    assert loaded.config.telemetry.node_ttl_s == 9.0 and loaded.config.pool.worker_spin_us == 5.0
    assert loaded.sources["telemetry.node_ttl_s"] == "env FABRIC_NODE_TTL_S"
    assert any("FABRIC_NODE_TTL_S is deprecated: use FABRIC_TELEMETRY_NODE_TTL_S" in w for w in loaded.warnings)
    assert any("FABRIC_WORKER_SPIN_US is deprecated: use FABRIC_POOL_WORKER_SPIN_US" in w for w in loaded.warnings)
    # the new name wins over the old one
    both = _load(tmp_path, {"FABRIC_NODE_TTL_S": "9", "FABRIC_TELEMETRY_NODE_TTL_S": "7"})
    assert both.config.telemetry.node_ttl_s == 7.0 and "ignored" in both.warnings[0]


# -- names --------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_environment_names_follow_the_rule_and_are_unique() -> None:
    names = [key.env for key in KEYS.values()]
    assert len(names) == len(set(names)), "two keys map to one variable"
    for path, key in KEYS.items():
        assert key.env == "FABRIC_" + path.upper().replace(".", "_") == env_name(path)
    # no old name, no non-configuration variable, no section prefix collides with a key's name
    assert not set(names) & (set(DEPRECATED_ENV) | set(NOT_CONFIG_ENV))
    assert set(DEPRECATED_ENV.values()) <= set(KEYS)
    assert not any(n.startswith(tuple(section_prefixes())) for n in (*DEPRECATED_ENV, *NOT_CONFIG_ENV))
    # the names the docs and the issue promise
    assert {KEYS[p].env for p in ("mem.capacity", "mem.quota", "mem.quotas", "telemetry.interval_s",
                                  "telemetry.node_ttl_s", "pool.reader_spin_us", "pool.worker_spin_us",
                                  "nats.url", "node", "state_dir", "log_level")} == {
        "FABRIC_MEM_CAPACITY", "FABRIC_MEM_QUOTA", "FABRIC_MEM_QUOTAS", "FABRIC_TELEMETRY_INTERVAL_S",
        "FABRIC_TELEMETRY_NODE_TTL_S", "FABRIC_POOL_READER_SPIN_US", "FABRIC_POOL_WORKER_SPIN_US",
        "FABRIC_NATS_URL", "FABRIC_NODE", "FABRIC_STATE_DIR", "FABRIC_LOG_LEVEL"}
    assert set(SECTIONS) == {"nats", "up", "sandbox", "mem", "pool", "telemetry", "tasks", "gateway"}


@pytest.mark.unit
def test_every_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    for path, key in KEYS.items():
        assert f"| `{path}` |" in doc and f"`{key.env}`" in doc, path


@pytest.mark.unit
def test_the_default_ttl_is_the_registry_one() -> None:
    registry = pytest.importorskip("fabric.services.gpu_monitor.registry")
    assert TelemetryConfig().node_ttl_s == registry.DEFAULT_TTL_S


# -- services take their section -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_services_read_their_section_from_the_settings(tmp_path: Path) -> None:
    from fabric.services.gpu_monitor.service import GpuMonitorService
    from fabric.services.spawner.pool_types import PoolEnv

    cfg = FabricConfig(telemetry=TelemetryConfig(interval_s=0.5, node_ttl_s=2.0),
                       pool=PoolConfig(reader_spin_us=10.0, worker_spin_us=20.0))
    settings = ServiceSettings(nats_url="nats://127.0.0.1:1", node="cfg", state_dir=tmp_path, config=cfg)
    monitor = GpuMonitorService(settings)
    assert (monitor.interval_s, monitor.ttl_s) == (0.5, 2.0)
    # keyword overrides still win, and are checked like the configuration
    assert GpuMonitorService(settings, interval_s=0.25).interval_s == 0.25
    with pytest.raises(ValueError, match="telemetry.interval_s: expected float >= 0.05"):
        GpuMonitorService(settings, interval_s=0.01)
    assert PoolEnv.from_config(cfg.pool) == PoolEnv(reader_spin_us=10.0, worker_spin_us=20.0)


@pytest.mark.unit
def test_a_service_with_a_bad_configuration_fails_its_start_saying_why(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("[telemetry]\ninterval_s = 'often'\n")
    res = subprocess.run(
        [sys.executable, "-m", "fabric.services.gpu_monitor", "--nats-url", "nats://127.0.0.1:1", "--node", "n",
         "--state-dir", str(tmp_path)],
        env=_clean_env(FABRIC_MEM_CAPACTY="1"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "telemetry.interval_s: expected float, got str (file " in res.stderr
    assert "did you mean FABRIC_MEM_CAPACITY? (env FABRIC_MEM_CAPACTY)" in res.stderr


# -- fabric config validate / show ----------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabric.cli", "config", *args], env=env or _clean_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.unit
def test_validate_reports_every_error_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mem]\ncapacity = 'x'\nextra = 1\n[pool]\nreader_spin_us = -1\n")
    res = _cli("validate", str(bad))
    assert res.returncode == 1
    assert "3 problems" in res.stderr
    for line in ("mem.capacity: expected int, got str", "mem.extra: unknown key",
                 "pool.reader_spin_us: expected float >= 0.0, got -1"):
        assert line in res.stderr, res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[mem\n")
    res = _cli("validate", str(broken))
    assert res.returncode == 1 and "not valid TOML" in res.stderr


@pytest.mark.unit
def test_validate_says_a_good_file_is_valid(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("node = 'n1'\n[mem]\ncapacity = 1048576\n[mem.quotas]\nalice = 1024\n"
                    "[telemetry]\ninterval_s = 0.5\nnode_ttl_s = 1\n")
    res = _cli("validate", str(good))
    assert res.returncode == 0, res.stderr
    assert f"{good}: valid" in res.stdout.replace("\n", "")


@pytest.mark.unit
def test_show_says_where_each_value_came_from(tmp_path: Path) -> None:
    (tmp_path / "fabric.toml").write_text("[mem]\ncapacity = 1048576\nquota = 5\n")
    res = _cli("show", "--state-dir", str(tmp_path), "--json", env=_clean_env(FABRIC_MEM_QUOTA="6"))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["file"] == str(tmp_path / "fabric.toml")
    assert doc["config"]["mem"]["capacity"] == 1048576 and doc["config"]["mem"]["quota"] == 6
    assert doc["sources"]["mem.capacity"] == f"file {tmp_path / 'fabric.toml'}"
    assert doc["sources"]["mem.quota"] == "env FABRIC_MEM_QUOTA"
    assert doc["sources"]["state_dir"] == "flag --state-dir"
    assert doc["sources"]["telemetry.interval_s"] == "default"
    assert doc["env"]["telemetry.node_ttl_s"] == "FABRIC_TELEMETRY_NODE_TTL_S"
    table = _cli("show", "--state-dir", str(tmp_path), env=_clean_env(FABRIC_MEM_QUOTA="6"))
    assert table.returncode == 0, table.stderr
    assert any(line.split() == ["mem.quota", "6", "env", "FABRIC_MEM_QUOTA", "FABRIC_MEM_QUOTA"]
               for line in table.stdout.splitlines()), table.stdout
    bad = _cli("show", "--state-dir", str(tmp_path), env=_clean_env(FABRIC_MEM_QUOTA="lots"))
    assert bad.returncode == 1 and "mem.quota: expected int, got str (env FABRIC_MEM_QUOTA)" in bad.stderr


@pytest.mark.unit
def test_up_with_a_bad_config_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[up]\ngrace_s = -1\nready = 1\n")
    state = tmp_path / "state"
    res = subprocess.run([sys.executable, "-m", "fabric.cli", "up", "-d", "--state-dir", str(state),
                          "--nats-port", "0", "--config", str(bad)],
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "invalid configuration (2 problems)" in res.stderr
    assert "up.grace_s: expected float >= 0.0, got -1" in res.stderr and "up.ready: unknown key" in res.stderr
    assert not state.exists(), "fabric up started something with an invalid configuration"


# -- a real fabric runs with its state directory's fabric.toml --------------------------------------------------------


def _fabric(command: str, state: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabric.cli", command, "--state-dir", str(state), *args],
                          env=_clean_env(**env), capture_output=True, text=True, timeout=90)


def _cleanup(state: Path) -> None:
    """Stop the fabric in *state*, kill whatever it left, and drop its arena's shared memory."""
    import psutil

    _fabric("down", state, "--grace", "2")
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(state) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass
    for ident in (state / "allocator").glob("*.json"):
        prefix = json.loads(ident.read_text()).get("prefix")
        for seg in Path("/dev/shm").glob(f"{prefix}*") if prefix else ():
            seg.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["state-dir", "--config"])
def test_fabric_up_runs_the_services_with_the_file(tmp_path: Path, where: str) -> None:
    """The file in the state directory (each service finds it), or --config FILE (fabric up passes it on)."""
    pytest.importorskip("fabric.services.allocator", reason="the allocator (and its Cython arena) is not built")
    state = tmp_path / "state"
    state.mkdir()
    file = state / "fabric.toml" if where == "state-dir" else tmp_path / "elsewhere.toml"
    file.write_text("node = 'cfg-node'\n"
                    "[mem]\ncapacity = 25165824\n"  # 24 MiB: no default is that
                    "[telemetry]\ninterval_s = 0.5\nnode_ttl_s = 2.5\n")
    extra = ["--config", str(file)] if where == "--config" else []
    try:
        # a renamed variable still works (over the file's 2.5), with a warning from fabric up and in the log
        up = _fabric("up", state, "-d", "--nats-port", "0", "--timeout", "60", *extra, FABRIC_NODE_TTL_S="4")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node cfg-node" in up.stdout  # fabric up read the file too
        assert "FABRIC_NODE_TTL_S is deprecated: use FABRIC_TELEMETRY_NODE_TTL_S" in up.stderr
        assert "FABRIC_NODE_TTL_S is deprecated" in (state / "logs" / "gpu-monitor.log").read_text()
        info = _fabric("req", state, "fabric.mem.cfg-node.info")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["capacity"] == 24 * MiB
        monitor = _fabric("req", state, "$SRV.INFO.gpu-monitor")
        assert monitor.returncode == 0, monitor.stderr
        assert json.loads(monitor.stdout)["metadata"]["interval_s"] == "0.5"
    finally:
        _cleanup(state)


def test_every_key_that_defaults_to_unset_says_what_unset_means() -> None:
    """``fabric config show`` prints "- (what it means)" for an unset key: each one needs its words."""
    import msgspec

    from fabric.config.model import UNSET_MEANS

    defaults = msgspec.to_builtins(FabricConfig())
    unset = {path for path in KEYS
             if (defaults.get(path) if "." not in path else defaults[path.split(".")[0]][path.split(".")[1]]) is None}
    assert unset and unset == set(UNSET_MEANS)


def test_a_service_on_its_own_names_the_node_as_fabric_up_does(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Unset ``node`` is the short host name for ``fabric up`` and for a service started by hand alike.

    A service started on its own used the whole host name (``db-1_example_com``) while
    ``fabric up`` used the short one (``db-1``): the two did not name the same node.
    """
    import socket

    from fabric.config import default_node
    from fabric.service import parse_settings

    monkeypatch.setattr(socket, "gethostname", lambda: "db-1.example.com")
    settings, _ = parse_settings(["--state-dir", str(tmp_path)], "allocator", environ={})
    assert default_node() == settings.node == "db-1"
