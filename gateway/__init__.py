"""tunnel-gateway: reach services behind NAT through one gateway, over one gRPC stream per agent."""

__version__ = "0.1.0"
