"""A worker's listening ports, all shared with the other workers
(SO_REUSEPORT): the tunnel endpoint (our own HTTP/2, or grpc.aio with
tunnel_server = "grpcio"), the gRPC entry (grpc.aio), the HTTP entry (our
own HTTP/1.1, `gateway/http/entry_server.py`) and the admin port (aiohttp).
With proxy_protocol the HTTP entry and the tunnel port read a PROXY header
first (`proxied.py`)."""
from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import grpc.aio
from aiohttp import web

from gateway.http.connections import EntryLimits
from gateway.http.entry import entry_server
from gateway.http.entry_server import EntryServer
from gateway.http.grpc_bridge import MAX_MESSAGE
from gateway.tls import http_ssl_context, server_credentials
from gateway.tunnel.h2_server import TunnelServer, server_ssl_context
from gateway.tunnel.transport import grpc_options, tunnel_handler
from gateway.workers.admin import admin_app
from gateway.workers.grpc_entry import GrpcEntry
from gateway.workers.proxied import ProxiedServer, Relay, bind_sockets

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["Listeners"]


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {what} {address}: {exc}") from None


class Listeners:
    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.tunnel: grpc.aio.Server | None = None  # tunnel_server = "grpcio"
        self.tunnel_server: TunnelServer | None = None  # tunnel_server = "builtin"
        self.tunnel_proxied: ProxiedServer | None = None  # the public tunnel port, with proxy_protocol
        self.grpc_entry: grpc.aio.Server | None = None
        self.http: EntryServer | None = None
        self.http_proxied: ProxiedServer | None = None  # the HTTP entry's port, with proxy_protocol
        self.admin: web.BaseRunner | None = None

    async def start(self) -> None:
        """Bind every port (OSError when one cannot be bound) and start serving."""
        worker = self.worker
        cfg = worker.config
        max_message = cfg.max_batch_bytes * 2 + cfg.max_header_bytes + cfg.chunk_size + (1 << 20)
        if cfg.tunnel_server == "builtin":
            await self._start_builtin_tunnel(max_message)
        else:
            self._start_grpc_tunnel(max_message)
        if cfg.grpc_port:
            self.grpc_entry = grpc.aio.server(options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ])
            entry = GrpcEntry(worker.routing, worker.ids, access_log=worker.access_log, metrics=worker.metrics)
            self.grpc_entry.add_generic_rpc_handlers([entry])
            creds = server_credentials(cfg.tls_cert, cfg.tls_key) if cfg.http_tls else None
            _bind(self.grpc_entry, f"{cfg.host}:{cfg.grpc_port}", creds, "gRPC entry")
        if self.tunnel is not None:
            await self.tunnel.start()
        if self.tunnel_proxied is not None:
            self.tunnel_proxied.start()
        if self.grpc_entry is not None:
            await self.grpc_entry.start()

        dropped = worker.metrics.dropped_connections
        self.http = http = entry_server(worker.http_entry.handle, cfg.max_header_bytes, EntryLimits.of(cfg),
                                        on_drop=lambda reason: dropped.labels("http", reason).inc())
        tls = {"ssl_context": http_ssl_context(cfg.tls_cert, cfg.tls_key) if cfg.http_tls else None,
               "handshake_timeout": cfg.header_timeout}
        if cfg.proxy_protocol:
            # Each connection's PROXY header first (within header_timeout), then TLS, if any, then HTTP.
            async def accept(conn: socket.socket, source: tuple[str, int] | None, _peer: tuple[str, int],
                             _deadline: float) -> None:
                await http.accept(conn, source, **tls)

            self.http_proxied = ProxiedServer(bind_sockets(cfg.host, cfg.http_port), accept,
                                              timeout=cfg.header_timeout, max_pending=cfg.max_connections,
                                              what="http", on_drop=lambda reason: dropped.labels("http", reason).inc())
            self.http_proxied.start()
        else:
            await http.listen(cfg.host, cfg.http_port, reuse_port=True, **tls)

        self.admin = web.AppRunner(admin_app(worker), handle_signals=False, access_log=None)
        await self.admin.setup()
        await web.TCPSite(self.admin, cfg.admin_host, cfg.admin_port, reuse_port=True).start()

    async def _start_builtin_tunnel(self, max_message: int) -> None:
        """The tunnel port on our own HTTP/2 (gateway/tunnel/h2_server.py)."""
        worker = self.worker
        cfg = worker.config
        ctx = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None
        self.tunnel_server = TunnelServer(worker.endpoint.serve, max_message=max_message,
                                          keepalive=cfg.heartbeat_interval, ssl_context=ctx,
                                          handshake_timeout=cfg.hello_timeout)
        if cfg.proxy_protocol:
            self.tunnel_proxied = ProxiedServer(bind_sockets(cfg.host, cfg.tunnel_port),
                                                self.tunnel_server.serve_accepted, timeout=cfg.header_timeout,
                                                max_pending=cfg.max_connections, what="tunnel")
            return
        try:
            await self.tunnel_server.listen(cfg.host, cfg.tunnel_port)
        except OSError as exc:
            raise OSError(f"cannot bind tunnel port {cfg.host}:{cfg.tunnel_port}: {exc}") from None

    def _start_grpc_tunnel(self, max_message: int) -> None:
        """The tunnel port on grpcio (tunnel_server = "grpcio")."""
        worker = self.worker
        cfg = worker.config
        self.tunnel = grpc.aio.server(
            options=grpc_options(max_message, int(cfg.heartbeat_interval * 1000), server=True),
        )
        self.tunnel.add_generic_rpc_handlers([tunnel_handler(worker.endpoint.serve, max_message)])
        tunnel_creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None
        if cfg.proxy_protocol:
            # grpc cannot be handed sockets: it listens on loopback, behind a relay
            # on the public port that reads each connection's PROXY header.
            inner = _bind(self.tunnel, "127.0.0.1:0", tunnel_creds, "tunnel port (behind the PROXY relay)")
            relay = Relay(("127.0.0.1", inner))
            worker.endpoint.resolve_peer = relay.resolve
            self.tunnel_proxied = ProxiedServer(bind_sockets(cfg.host, cfg.tunnel_port), relay,
                                                timeout=cfg.header_timeout, max_pending=cfg.max_connections,
                                                what="tunnel")
        else:
            _bind(self.tunnel, f"{cfg.host}:{cfg.tunnel_port}", tunnel_creds, "tunnel port")

    async def stop_accepting(self, grace: float) -> list[asyncio.Task]:
        """Close the public ports now; the tasks end when running calls and
        streams have had `grace` to finish."""
        worker = self.worker
        assert self.http is not None
        self.http.close()
        if self.http_proxied is not None:
            self.http_proxied.close()
        stopping = []
        if self.grpc_entry is not None:
            # Stop taking calls; running ones get the grace period.
            stopping.append(worker.spawn(self.grpc_entry.stop(grace)))
        # The tunnel port closes now (clients reconnect to other workers);
        # running streams go on for the grace period.
        if self.tunnel_proxied is not None:
            self.tunnel_proxied.close()  # relays running go on: they end with their grpc connection
        tunnel = self.tunnel if self.tunnel is not None else self.tunnel_server
        stopping.append(worker.spawn(tunnel.stop(grace + 1)))
        return stopping

    async def cleanup(self) -> None:
        if self.http is not None:
            await self.http.shutdown()
        if self.admin is not None:
            await self.admin.cleanup()
