"""How pdserve processes make internal HTTP clients for the control plane (health, load, events, /send):
httpx with pooled keep-alive connections and TCP_NODELAY, carrying the cluster's internal token. The data
plane (token streams from workers to the router) is `protocol/stream_client.py`."""

import socket

import httpx

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


TOKEN_HEADER = "x-pdserve-token"  # the cluster's internal token: workers answer only callers that hold it


def internal_client(timeout: httpx.Timeout, max_connections: int = 1000, token: str | None = None
                    ) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = httpx.AsyncHTTPTransport(socket_options=NODELAY, limits=limits)
    headers = {TOKEN_HEADER: token} if token else None
    return httpx.AsyncClient(timeout=timeout, transport=transport, headers=headers)
