"""Configuration: defaults < TOML < environment < flags, and refusals that name the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runwatch.daemon.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RUNWATCH_"):
            monkeypatch.delenv(key)


def test_defaults_work_for_a_non_root_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    s = load_settings()
    assert s.socket == Path("/run/user/1000/runwatch/runwatch.sock")
    assert s.state_dir == Path("/home/u/.local/state/runwatch")
    assert s.exporter_address == "127.0.0.1"


def test_systemd_directories_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/runwatch")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/runwatch")
    s = load_settings()
    assert s.socket == Path("/run/runwatch/runwatch.sock")
    assert s.store_path == Path("/var/lib/runwatch/runwatch.db")


def test_precedence_toml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "runwatch.toml"
    cfg.write_text('exporter_port = 9100\nlog_level = "debug"\nsocket_mode = "0600"\n')
    s = load_settings(cfg)
    assert (s.exporter_port, s.log_level, s.socket_mode) == (9100, "debug", 0o600)
    monkeypatch.setenv("RUNWATCH_EXPORTER_PORT", "9200")
    assert load_settings(cfg).exporter_port == 9200
    assert load_settings(cfg, exporter_port=9300).exporter_port == 9300
    assert load_settings(cfg, exporter_port=None).exporter_port == 9200


@pytest.mark.parametrize(
    ("toml", "expect"),
    [
        ("exporter_port = 70000", "setting 'exporter_port' from"),
        ('exporter_address = "localhost:80"', "setting 'exporter_address'"),
        ('socket_mode = "rw-"', "setting 'socket_mode'"),
        ("frobnicate = 1", "setting 'frobnicate' from"),
        ('log_level = "loud"', "setting 'log_level'"),
        ("[drift]\ndebounce_k = 5", "setting 'drift' from"),
        ("[drift]\nwindow_values = 0", "setting 'drift.window_values' from"),
        ("[drift]\nwarn_quantile = 0.999\ncritical_quantile = 0.99", "critical tier must not be below"),
    ],
)
def test_wrong_values_name_the_setting(tmp_path: Path, toml: str, expect: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expect in str(err.value) and str(cfg) in str(err.value)


def test_env_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWATCH_MAX_FRAME_BYTES", "12")
    with pytest.raises(ConfigError, match="max_frame_bytes' from RUNWATCH_MAX_FRAME_BYTES"):
        load_settings()


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("exporter_port = = 3\n")
    with pytest.raises(ConfigError, match=r"broken.toml: .*line 1"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def _daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runwatch.daemon", "daemon", *args],
                          capture_output=True, text=True, timeout=60)


def test_daemon_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("exporter_port = -1\n")
    r = _daemon("--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2
    assert "exporter_port" in r.stderr and "greater than or equal to 0" in r.stderr
    assert not (tmp_path / "s").exists(), "nothing may be created before the config is valid"


def test_drift_settings_reach_the_monitors(tmp_path: Path) -> None:
    from runwatch.daemon.service import drift_config

    cfg = tmp_path / "drift.toml"
    cfg.write_text("[drift]\nwindow_values = 256\nbins = 20\ndebounce_k = 1\n")
    config = drift_config(load_settings(cfg))
    assert (config.window_values, config.bins, config.debounce_k, config.debounce_m) == (256, 20, 1, 3)
