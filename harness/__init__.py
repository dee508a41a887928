"""What tests and benchmarks both need to run sdmesh for real: servers as
OS processes on free loopback ports (tied to the process that started them),
throwaway PostgreSQL clusters, and waiting for a condition. `tests/` and
`bench/` import this; it imports neither (`make lint` checks it)."""
