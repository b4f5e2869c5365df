"""Staged config rollouts: a group's new config goes to a few canary clients
first, is judged against the rest over a bake time, then promoted to all or
rolled back. `spec` is the [groups.NAME.rollout] table, `plan` the state and
its decisions (pure), `stats` the per-worker figures the entries feed,
`state_file` where a node keeps it across restarts. The worker side (who
decides, who is told) is gateway/workers/rollouts.py."""
