"""Write Hivemind roles in Python.

A role is a class with plain methods; ``export`` turns it into the component's
``role`` world for componentize-py::

    import hivemind_role as hm

    class Hello(hm.Role):
        name = "hello"
        version = "0.1.0"
        subscribes = ["service."]

        def on_event(self, event):
            hm.state.set_json("last", event.json())

        def on_request(self, request):
            return hm.Response.json({"last": hm.state.get_json("last")})

    WitWorld = hm.export(Hello)

Build it with ``componentize-py -d WIT -w role componentize -p SDK -p . app
-o hello.wasm`` (``hivemind roles new hello --lang python`` writes a project
that does this).

The host may run several instances of a role and replace any of them at any
time (after a trap, on reload): what a handler leaves in memory is not
guaranteed to be there on the next call. Keep what matters in ``state``.
"""

from __future__ import annotations

import json as _json
import traceback as _traceback
from json.encoder import encode_basestring as _json_string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from componentize_py_types import Err

import wit_world
from wit_world.imports import host as _host
from wit_world.imports import state as _state
from wit_world.imports import types as _types

__all__ = [
    "Role",
    "Event",
    "Request",
    "Response",
    "Node",
    "HostError",
    "host",
    "state",
    "export",
]


class HostError(Exception):
    """A host call failed; ``kind`` is one of ``denied``, ``invalid``,
    ``unavailable``, ``overloaded`` or ``failed``. The role keeps running."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


_HOST_ERROR_KINDS = {
    _types.HostError_Denied: "denied",
    _types.HostError_Invalid: "invalid",
    _types.HostError_Unavailable: "unavailable",
    _types.HostError_Overloaded: "overloaded",
    _types.HostError_Failed: "failed",
}


def _host_call(function: Callable[..., Any], *args: Any) -> Any:
    """Calls an import that returns ``result<T, host-error>``, turning the
    error into a ``HostError``."""
    try:
        return function(*args)
    except Err as error:
        value = error.value
        kind = _HOST_ERROR_KINDS.get(type(value), "failed")
        raise HostError(kind, str(getattr(value, "value", value))) from None


def _to_bytes(payload: Any) -> bytes:
    """Bytes as they are; ``str`` as UTF-8; anything else as JSON."""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return _json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Event:
    """One committed entry of the cluster's event log."""

    seq: int
    epoch: int
    kind: str
    key: str
    source: str
    timestamp_ms: int
    payload: bytes

    def json(self) -> Any:
        """The payload parsed as JSON; raises ``ValueError`` naming the event
        when it is not JSON."""
        try:
            return _json.loads(self.payload)
        except ValueError as error:
            raise ValueError(
                f"event {self.seq} ({self.kind} {self.key}): payload is not JSON: {error}"
            ) from None


@dataclass
class Request:
    """A request for the role: ``/v1/roles/NAME/...`` on the API, or
    ``hivemind role NAME CMD ARGS...`` on the CLI (``POST /CMD`` with
    ``{"args": [...]}``)."""

    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def command(self) -> str:
        """The first path segment: ``records`` for ``/records/web``."""
        return self.path.lstrip("/").split("/", 1)[0]

    @property
    def args(self) -> list[str]:
        """The CLI's arguments, or else the path segments after the command."""
        try:
            body = _json.loads(self.body)
            if isinstance(body, dict) and isinstance(body.get("args"), list):
                return [str(arg) for arg in body["args"]]
        except ValueError:
            pass
        return [segment for segment in self.path.lstrip("/").split("/")[1:] if segment]

    def query_param(self, name: str) -> Optional[str]:
        """The value of query parameter ``name`` (not percent-decoded)."""
        for pair in self.query.split("&"):
            key, _, value = pair.partition("=")
            if key == name:
                return value
        return None

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name``, ignoring case."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` when it is not."""
        try:
            return _json.loads(self.body)
        except ValueError as error:
            raise ValueError(f"request body is not JSON: {error}") from None


# One encoder for every response: `json.dumps` builds one per call.
_JSON_ENCODER = _json.JSONEncoder()


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @staticmethod
    def json(value: Any, status: int = 200) -> "Response":
        return Response(status, [("content-type", "application/json")], _JSON_ENCODER.encode(value).encode())

    @staticmethod
    def text(text: str, status: int = 200) -> "Response":
        return Response(status, [("content-type", "text/plain; charset=utf-8")], text.encode())

    @staticmethod
    def error(status: int, message: str) -> "Response":
        """``{"error": message}``, the shape the host's own errors have."""
        # Built by hand: this is the most common answer, and each Python
        # call inside a component costs about a microsecond.
        body = ('{"error":' + _json_string(message) + "}").encode()
        return Response(status, [("content-type", "application/json")], body)

    @staticmethod
    def not_found(request: Request) -> "Response":
        return Response.error(404, f"no such command or route: {request.method} {request.path}")


@dataclass
class Node:
    """A member of the cluster as the host sees it."""

    id: str
    name: str
    address: str
    roles: list[str]
    healthy: bool


def _node(node: _types.Node) -> Node:
    return Node(node.id, node.name, node.address, list(node.roles), node.healthy)


def _event(event: _types.Event) -> Event:
    return Event(
        event.seq, event.epoch, event.kind, event.key, event.source, event.timestamp_ms, bytes(event.payload)
    )


class host:
    """Host functions. Those that can fail raise ``HostError``."""

    @staticmethod
    def log(level: str, message: str) -> None:
        """``level`` is one of trace, debug, info, warn, error."""
        _host.log(_host.Level[level.upper()], message)

    @staticmethod
    def info(message: str) -> None:
        _host.log(_host.Level.INFO, message)

    @staticmethod
    def warn(message: str) -> None:
        _host.log(_host.Level.WARN, message)

    @staticmethod
    def error(message: str) -> None:
        _host.log(_host.Level.ERROR, message)

    @staticmethod
    def emit(kind: str, key: str, payload: Any) -> int:
        """Appends an event (``payload`` as bytes, str or JSON) and returns
        its seq once durable. Needs ``grants.emit``."""
        return _host_call(_host.emit, kind, key, _to_bytes(payload))

    @staticmethod
    def events_since(after: int, kind_prefix: str = "", limit: int = 100) -> list[Event]:
        return [_event(event) for event in _host_call(_host.events_since, after, kind_prefix, limit)]

    @staticmethod
    def nodes(role: Optional[str] = None, healthy_only: bool = False) -> list[Node]:
        return [_node(node) for node in _host.nodes(role, healthy_only)]

    @staticmethod
    def self_node() -> Node:
        return _node(_host.self_node())

    @staticmethod
    def config() -> Any:
        """The manifest's ``[config]`` table as a dict."""
        return _json.loads(_host.config())

    @staticmethod
    def call(node: str, role: str, request: Request) -> Response:
        """Calls ``role``'s ``on_request`` on ``node``."""
        reply = _host_call(
            _host.call,
            node,
            role,
            _types.Request(request.method, request.path, request.query, request.headers, request.body),
        )
        return Response(reply.status, list(reply.headers), bytes(reply.body))

    @staticmethod
    def write_file(path: str, contents: Any) -> None:
        """Atomically writes below the granted ``grants.write-dir``."""
        _host_call(_host.write_file, path, _to_bytes(contents))

    @staticmethod
    def exec(program: str, args: list[str], timeout_ms: int = 5000) -> tuple[int, bytes, bytes]:
        """Runs a program granted by ``grants.exec``: (status, stdout, stderr)."""
        output = _host_call(_host.exec, program, args, timeout_ms)
        return output.status, bytes(output.stdout), bytes(output.stderr)

    @staticmethod
    def check_tcp(address: str, timeout_ms: int = 1000) -> int:
        """Milliseconds a TCP connect to ``HOST:PORT`` took; ``HostError``
        (``unavailable``) when it failed. Needs ``grants.check``."""
        return _host_call(_host.check, _host.HealthCheck_Tcp(address), timeout_ms)

    @staticmethod
    def check_http(url: str, timeout_ms: int = 1000) -> int:
        """Milliseconds a GET of ``url`` took to answer 2xx."""
        return _host_call(_host.check, _host.HealthCheck_Http(url), timeout_ms)

    @staticmethod
    def count(name: str, labels: Optional[dict[str, str]] = None, delta: int = 1) -> None:
        """Adds ``delta`` to the counter ``name`` for ``labels``, served at
        the host's ``/metrics`` as ``hivemind_counter_NAME_total``. Each call
        crosses into the host: on a hot path, sum and report in batches."""
        _host_call(_host.count, name, list((labels or {}).items()), delta)

    @staticmethod
    def keep_reply(skip: int, tally: Optional[tuple[str, dict[str, str]]] = None) -> None:
        """Inside ``on_packet`` for a UDP datagram: lets the host answer later
        datagrams on the same listener that match this one after its first
        ``skip`` bytes with the reply being returned (its first ``skip``
        bytes taken from each datagram), without calling the role. Only for
        a reply that depends on nothing but the datagram and what the role
        holds; the host forgets kept replies after an event or a request and
        on ``forget_replies``. With ``tally`` (``(name, labels)``), each
        reuse adds one to that counter as ``count`` would."""
        kept_tally = None if tally is None else (tally[0], list(tally[1].items()))
        _host_call(_host.keep_reply, skip, kept_tally)

    @staticmethod
    def forget_replies() -> None:
        """Forgets every reply kept with ``keep_reply`` once this call ends."""
        _host.forget_replies()


class state:
    """Durable key-value state private to the role: it survives reloads,
    new versions and host restarts."""

    @staticmethod
    def get(key: str) -> Optional[bytes]:
        value = _state.get(key)
        return None if value is None else bytes(value)

    @staticmethod
    def set(key: str, value: Any) -> None:
        """``value`` as bytes, str or JSON."""
        _host_call(_state.set, key, _to_bytes(value))

    @staticmethod
    def delete(key: str) -> None:
        _host_call(_state.delete, key)

    @staticmethod
    def keys(prefix: str = "") -> list[str]:
        return list(_state.keys(prefix))

    @staticmethod
    def get_json(key: str, default: Any = None) -> Any:
        value = _state.get(key)
        return default if value is None else _json.loads(value)

    @staticmethod
    def set_json(key: str, value: Any) -> None:
        _host_call(_state.set, key, _json.dumps(value, separators=(",", ":")).encode())


class Role:
    """A role's handlers; override what the role needs. ``name``,
    ``version``, ``subscribes`` (event kind prefixes, ``""`` for all) and
    ``tick_interval_ms`` describe it."""

    name: str = "role"
    version: str = "0.1.0"
    subscribes: list[str] = []
    tick_interval_ms: int = 0

    def init(self) -> None:
        """Runs once when a version is loaded; raising keeps the previous
        version serving and shows the message to the operator."""

    def on_event(self, event: Event) -> None:
        """A committed event; raising makes the host retry it later, so
        handling one twice must be harmless."""

    def on_request(self, request: Request) -> Response:
        return Response.not_found(request)

    def on_packet(self, listener: str, peer: str, data: bytes) -> Optional[bytes]:
        """A datagram (or framed TCP message) on a host-owned listener; the
        bytes returned are sent back."""
        return None

    def on_tick(self) -> None:
        """Periodic work, every ``tick_interval_ms``."""


def _failure(error: BaseException) -> str:
    """An exception as one line for the operator: its type and message,
    and where in the role it was raised."""
    frames = _traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def export(role_class: type[Role]) -> type:
    """The ``WitWorld`` class componentize-py exports, calling one
    ``role_class`` instance per component instance."""
    role = role_class()

    class Exports(wit_world.WitWorld):
        def describe(self) -> _types.Description:
            return _types.Description(
                role.name, role.version, list(role.subscribes), int(role.tick_interval_ms)
            )

        def init(self) -> None:
            try:
                role.init()
            except Exception as error:
                raise Err(_failure(error))

        def on_event(self, event: _types.Event) -> None:
            try:
                role.on_event(_event(event))
            except Exception as error:
                raise Err(_failure(error))

        def on_request(self, request: _types.Request) -> _types.Response:
            # The bindings already give a list and bytes: no copies on the
            # way in or out (a call's cost is mostly such Python work).
            try:
                response = role.on_request(
                    Request(request.method, request.path, request.query, request.headers, request.body)
                )
            except Exception as error:
                response = Response.error(500, _failure(error))
            body = response.body
            if not isinstance(body, bytes):
                body = _to_bytes(body)
            return _types.Response(response.status, response.headers, body)

        def on_packet(self, listener: str, peer: str, data: bytes) -> Optional[bytes]:
            try:
                reply = role.on_packet(listener, peer, bytes(data))
            except Exception as error:
                _host.log(_host.Level.WARN, f"on_packet: {_failure(error)}")
                return None
            return None if reply is None else bytes(reply)

        def on_tick(self) -> None:
            try:
                role.on_tick()
            except Exception as error:
                _host.log(_host.Level.WARN, f"on_tick: {_failure(error)}")

    Exports.__name__ = "WitWorld"
    return Exports
