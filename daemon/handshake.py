"""The HELLO handshake, validated with pydantic on the daemon side (the hook never imports this)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runwatch.daemon.protocol import CAPABILITIES, PROTOCOL_VERSION, RUN_NAME, ProtocolError, decode_json


class Hello(BaseModel):
    """The handshake. A hook names its run and rank; a CLI client only its role."""

    model_config = ConfigDict(extra="forbid")

    protocol: int
    role: Literal["hook", "cli"]
    run: str | None = None
    rank: int = Field(default=0, ge=0, lt=1 << 24)
    world_size: int = Field(default=1, ge=1, le=1 << 24)
    host: str = Field(default="", max_length=255)
    pid: int = Field(default=0, ge=0, lt=1 << 31)
    hook_version: str = Field(default="", max_length=64)
    # Where the run keeps checkpoints and reads data: for listings, manifests and retention.
    checkpoint_dir: str | None = Field(default=None, max_length=4096)
    data_dir: str | None = Field(default=None, max_length=4096)
    # Optional parts of the protocol this hook speaks (protocol.CAPABILITIES); absent: none.
    capabilities: list[str] = Field(default_factory=list, max_length=32)
    # Shared by every rank of one launch of the run, new on the next launch (or absent).
    launch: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")

    @field_validator("run")
    @classmethod
    def _run_name(cls, value: str | None) -> str | None:
        if value is not None and not RUN_NAME.fullmatch(value):
            raise ValueError(
                "run must be 1-200 characters of letters, digits and _ . : @ + -, "
                "starting with a letter or digit"
            )
        return value

    @field_validator("capabilities")
    @classmethod
    def _capability_names(cls, value: list[str]) -> list[str]:
        # Unknown names are allowed (a newer hook) and ignored; only their shape is checked.
        for name in value:
            if not 1 <= len(name) <= 64:
                raise ValueError("each capability is a name of 1-64 characters")
        return value

    def granted(self) -> frozenset[str]:
        """The capabilities both ends speak: what this connection uses."""
        return frozenset(self.capabilities) & frozenset(CAPABILITIES)


def decode_hello(payload: bytes) -> Hello:
    obj = decode_json(payload)
    version = obj.get("protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version",
            f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}",
        )
    try:
        hello = Hello.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "hello"
        raise ProtocolError("bad_handshake", f"{where}: {first['msg']}") from None
    if hello.role == "hook":
        if hello.run is None:
            raise ProtocolError("bad_handshake", "run: a hook must name its run")
        if hello.rank >= hello.world_size:
            raise ProtocolError(
                "bad_handshake", f"rank {hello.rank} is not below world_size {hello.world_size}"
            )
    return hello
