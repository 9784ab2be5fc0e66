"""Daemon settings: defaults < TOML file < ``RUNWATCH_*`` environment < CLI flags.

The TOML file is ``--config PATH`` when given, else ``/etc/runwatch/runwatch.toml`` when it
exists. A wrong value stops start-up with a :class:`ConfigError` naming the setting and
where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runwatch.daemon import paths
from runwatch.daemon.history import HistorySettings
from runwatch.daemon.notify.config import Alerting
from runwatch.daemon.retention.policy import Policy as RetentionPolicy

SYSTEM_CONFIG = Path("/etc/runwatch/runwatch.toml")


class ConfigError(Exception):
    """A setting the daemon refuses to start with. The message names it and why."""


class Playbook(BaseModel):
    """What the daemon does on its own when a rule names ``pause`` (see daemon/playbook.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True, description="Act on the actions rules name (false: record them only).")
    auto_rewind: bool = Field(
        default=True, description="Rewind a paused run to its last clean checkpoint without a person."
    )
    lr_scale: float = Field(default=0.1, gt=0, le=1, description="Learning-rate factor of each rewind.")
    skip_batches: int = Field(default=0, ge=0, description="Batches skipped after a rewind, besides "
                              "those between the checkpoint and the spike.")
    max_rewinds: int = Field(default=2, ge=0, description="Rewinds per incident before escalating.")
    watch_steps: int = Field(default=200, ge=1, description="Healthy steps after a rewind that "
                             "resolve the incident.")


class DriftReference(BaseModel):
    """``[[drift.references]]``: where the reference of the monitors it matches comes from,
    instead of being learned after warm-up (daemon/monitors.py; the first entry that matches wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    monitor: str = Field(min_length=1, description="Histogram name or glob: seq_length, activation_values/*.")
    run: str = Field(default="*", min_length=1, description="Monitored run name or glob.")
    steps: tuple[int, int] | None = Field(default=None, description="[first, last] step (inclusive) whose "
                                          "histograms form the reference.")
    from_run: str | None = Field(default=None, description="Take the reference from this run: its steps, "
                                 "or without steps its own frozen reference.")
    from_rank: int | None = Field(default=None, ge=0, description="...of this rank (default: the same rank).")

    @model_validator(mode="after")
    def _check(self) -> DriftReference:
        if self.steps is None and self.from_run is None:
            raise ValueError("give steps = [first, last], from_run = \"<run>\", or both")
        if self.steps is not None and not 0 <= self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps {list(self.steps)}: need 0 <= first <= last")
        if self.from_run is not None and not _RUN_NAME.fullmatch(self.from_run):
            raise ValueError(f"from_run {self.from_run!r} is not a run name (letters, digits, _ . : @ + -)")
        if self.from_rank is not None and self.from_run is None:
            raise ValueError("from_rank needs from_run")
        return self


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,199}")  # protocol.RUN_NAME, without numpy


class Drift(BaseModel):
    """The drift monitors over the histograms hooks stream (see daemon/drift.py for the math)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warmup_steps: int = Field(default=100, ge=0, description="Steps ignored before the reference.")
    reference_steps: int = Field(default=200, ge=1, description="Steps whose histograms form the "
                                 "reference (it grows until min_reference_values).")
    min_reference_values: int = Field(default=1000, ge=1, description="Values the reference needs.")
    window_values: int = Field(default=1024, ge=1, description="Values per compared window.")
    shard_window_values: int = Field(default=256, ge=1, description="Values per compared window of one "
                                     "data shard (its seq_length@shard windows).")
    bins: int = Field(default=10, ge=1, le=128, description="Coarse bins frozen at the reference's "
                      "quantiles (plus under- and overflow).")
    warn_quantile: float = Field(default=0.99, gt=0, lt=1, description="Chi-square quantile of the "
                                 "warning tier (its no-drift false-alarm rate is 1 minus this).")
    critical_quantile: float = Field(default=0.999, gt=0, lt=1, description="...of the critical tier.")
    warn_floor: float = Field(default=0.1, ge=0, description="PSI below which nothing warns.")
    critical_floor: float = Field(default=0.25, ge=0, description="PSI below which nothing is critical.")
    debounce_k: int = Field(default=2, ge=1, description="A tier holds when k of the last m windows")
    debounce_m: int = Field(default=3, ge=1, description="reach it.")
    references: list[DriftReference] = Field(default_factory=list, description="References frozen from "
                                             "a step range or another run, per monitor and run.")

    @model_validator(mode="after")
    def _check(self) -> Drift:
        if self.debounce_k > self.debounce_m:
            raise ValueError(f"debounce_k ({self.debounce_k}) must be at most debounce_m ({self.debounce_m})")
        if self.critical_quantile < self.warn_quantile or self.critical_floor < self.warn_floor:
            raise ValueError("the critical tier must not be below the warning tier"
                             " (critical_quantile >= warn_quantile, critical_floor >= warn_floor)")
        return self


class Settings(BaseSettings):
    """Everything the node daemon can be told. Each field is also ``RUNWATCH_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RUNWATCH_", extra="forbid", frozen=True)

    socket: Path = Field(default_factory=paths.default_socket_path)
    socket_mode: int = Field(
        default=0o660,
        description="Permission bits of the socket; group members of the daemon may connect.",
    )
    state_dir: Path = Field(default_factory=paths.default_state_dir)
    exporter_address: str = "127.0.0.1"
    exporter_port: int = Field(default=9478, ge=0, le=65535, description="0 picks a free port.")
    exporter_enabled: bool = True
    max_frame_bytes: int = Field(default=8 << 20, ge=4096, le=256 << 20)
    handshake_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    inflight_bytes: int = Field(
        default=64 << 20, ge=1 << 20, description="Decoded-but-uncommitted bytes held at most."
    )
    live_run_seconds: float = Field(
        default=300.0, gt=0, description="A run with no sample for this long is not listed as live."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    rules: list[Path] = Field(
        default_factory=lambda: [paths.default_rules_dir()],
        description="Rule files or folders of *.yaml; saving one reloads it.",
    )
    rules_enabled: bool = True
    sample_interval_seconds: float = Field(
        default=5.0, ge=0, le=3600, description="GPU and host sampling period; 0 switches the sampler off."
    )
    alerting: Alerting = Field(default_factory=Alerting, description="receivers, routes, grouping")
    playbook: Playbook = Field(default_factory=Playbook, description="pause, rewind, escalate")
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy, description="checkpoint keep policy")
    drift: Drift = Field(default_factory=Drift, description="drift monitors (PSI, JS, tiers)")
    history: HistorySettings = Field(default_factory=HistorySettings,
                                     description="how long raw steps and 1m/1h rollups are kept")
    store_reserve_mb: int = Field(
        default=64, ge=0, le=65536, description="Disk set aside beside the store for alerts when the disk "
        "fills (given up while full, taken back when space returns); 0 sets none aside.")
    retention_enabled: bool = Field(
        default=True, description="Delete what the retention policy keeps not (false: plan and show only).")
    retention_quiet_seconds: float = Field(
        default=30.0, ge=0, description="A checkpoint counts once nothing in it changed for this long.")
    retention_rescan_seconds: float = Field(
        default=60.0, gt=0, le=86400, description="Rescan checkpoint folders at least this often.")

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"{value!r} is not an octal mode such as '0660'") from None
        return value

    @field_validator("socket_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError(f"{oct(value)} is not a permission mode (0 to 0777)")
        return value

    @field_validator("exporter_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("socket", "state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("rules")
    @classmethod
    def _rule_paths(cls, value: list[Path]) -> list[Path]:
        out = []
        for p in value:
            p = p.expanduser().absolute()
            if not p.exists():
                raise ValueError(f"{p}: no such rule file or folder")
            out.append(p)
        return out

    @property
    def store_path(self) -> Path:
        return self.state_dir / "runwatch.db"


def _settings_class(toml_file: Path | None) -> type[Settings]:
    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            return tuple(sources)

    return FileSettings


def load_settings(config: Path | str | None = None, **flags: Any) -> Settings:
    """Build settings from every source; ``flags`` are CLI values (``None`` = not given)."""
    toml_file: Path | None
    if config is not None:
        toml_file = Path(config)
        if not toml_file.is_file():
            raise ConfigError(f"config file {toml_file}: not found")
    else:
        toml_file = SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None
    if toml_file is not None:
        try:
            tomllib.loads(toml_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {toml_file}: cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_file}: {exc}") from None
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return _settings_class(toml_file)(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_file, given)) from None


#: Settings whose values are secrets (a receiver's token, webhook URL or routing key), by name.
_SECRET_NAME = re.compile(r"(token|url|key|secret|password)[^.]*$")


def _describe(exc: ValidationError, toml_file: Path | None, flags: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else name
        if top in flags:
            origin = f"--{top.replace('_', '-')}"
        elif f"RUNWATCH_{top.upper()}" in os.environ:
            origin = f"RUNWATCH_{top.upper()}"
        elif toml_file is not None:
            origin = str(toml_file)
        else:
            origin = "default"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        value = err.get("input")
        # The value is echoed only when it is one plain setting that cannot be a secret: a whole
        # table (a receiver's, for a check across its fields) holds its token, URL or key.
        hidden = err["type"] == "extra_forbidden" or isinstance(value, dict | list) \
            or _SECRET_NAME.search(name) is not None
        shown = "" if hidden else f" (got {value!r})"
        lines.append(f"setting '{name}' from {origin}: {msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
