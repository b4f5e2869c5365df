"""The gateway worker process and its parts."""
