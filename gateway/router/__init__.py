"""Cross-worker routing (ZeroMQ router and shard table)."""
