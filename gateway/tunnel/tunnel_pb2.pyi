from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("request_id", "trace_id", "reply", "headers", "data", "reset", "window", "ping", "goaway", "hello", "welcome", "config", "fleet")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    GOAWAY_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    reply: bool
    headers: Headers
    data: Data
    reset: Reset
    window: Window
    ping: Ping
    goaway: GoAway
    hello: Hello
    welcome: Welcome
    config: Config
    fleet: Fleet
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., reply: _Optional[bool] = ..., headers: _Optional[_Union[Headers, _Mapping]] = ..., data: _Optional[_Union[Data, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., goaway: _Optional[_Union[GoAway, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., config: _Optional[_Union[Config, _Mapping]] = ..., fleet: _Optional[_Union[Fleet, _Mapping]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Headers(_message.Message):
    __slots__ = ("method", "path", "scheme", "authority", "status", "reason", "headers", "end_stream", "timeout_ms", "group", "target_client", "idle_timeout_ms", "header_fields")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLIENT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELDS_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    scheme: str
    authority: str
    status: int
    reason: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    end_stream: bool
    timeout_ms: int
    group: str
    target_client: str
    idle_timeout_ms: int
    header_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., scheme: _Optional[str] = ..., authority: _Optional[str] = ..., status: _Optional[int] = ..., reason: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., end_stream: _Optional[bool] = ..., timeout_ms: _Optional[int] = ..., group: _Optional[str] = ..., target_client: _Optional[str] = ..., idle_timeout_ms: _Optional[int] = ..., header_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("data", "end_stream")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_stream: bool
    def __init__(self, data: _Optional[bytes] = ..., end_stream: _Optional[bool] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("increment",)
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    increment: int
    def __init__(self, increment: _Optional[int] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce", "ack", "inflight", "unhealthy_upstreams", "health_report")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REPORT_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    ack: bool
    inflight: int
    unhealthy_upstreams: _containers.RepeatedScalarFieldContainer[str]
    health_report: bool
    def __init__(self, nonce: _Optional[int] = ..., ack: _Optional[bool] = ..., inflight: _Optional[int] = ..., unhealthy_upstreams: _Optional[_Iterable[str]] = ..., health_report: _Optional[bool] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("client_id", "group", "token", "version", "capabilities", "connection_index", "instance", "quick_upstream", "quick_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_INDEX_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    QUICK_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    QUICK_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    group: str
    token: str
    version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    connection_index: int
    instance: str
    quick_upstream: str
    quick_name: str
    def __init__(self, client_id: _Optional[str] = ..., group: _Optional[str] = ..., token: _Optional[str] = ..., version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., connection_index: _Optional[int] = ..., instance: _Optional[str] = ..., quick_upstream: _Optional[str] = ..., quick_name: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("accepted", "code", "message", "config_version", "config_json", "heartbeat_ms", "worker", "window", "chunk_size", "capabilities", "nodes", "public_url", "workers", "instance")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_URL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    code: str
    message: str
    config_version: str
    config_json: bytes
    heartbeat_ms: int
    worker: str
    window: int
    chunk_size: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    public_url: str
    workers: int
    instance: str
    def __init__(self, accepted: _Optional[bool] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., config_version: _Optional[str] = ..., config_json: _Optional[bytes] = ..., heartbeat_ms: _Optional[int] = ..., worker: _Optional[str] = ..., window: _Optional[int] = ..., chunk_size: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[str]] = ..., public_url: _Optional[str] = ..., workers: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class Fleet(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("config_version", "config_json", "error")
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    config_version: str
    config_json: bytes
    error: str
    def __init__(self, config_version: _Optional[str] = ..., config_json: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...
