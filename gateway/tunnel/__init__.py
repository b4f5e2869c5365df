"""The tunnel machinery shared by the gateway and the client: frames, streams, flow control."""
