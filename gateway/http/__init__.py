"""HTTP on both sides of a tunnel: the entries, the relay, the upstream client, the WebSocket and gRPC bridges."""
