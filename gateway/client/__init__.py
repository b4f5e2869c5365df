"""The tunnel client (agent): connects out, serves its group's requests, carries egress."""
