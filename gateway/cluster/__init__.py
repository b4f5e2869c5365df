"""Several gateway hosts as one gateway (the fleet): the registry of nodes in Redis."""
