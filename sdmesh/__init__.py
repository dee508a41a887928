"""The contract every sdmesh process shares: the scheduler, the GPU node
agents and the client.

It holds the vocabulary and nothing else: the domain types agents and the
scheduler exchange (devices, models, nodes, attempt updates and outcomes),
the job spec with its defaults and limits, samplers, speeds, the data-dir
lock, the wire facts (metadata keys, keepalive, backoff, addresses, the
package version, how a standby says so) and the one conversion between
these types and the `common` and `agent` protos.

It imports only `protos` and third-party libraries; `make lint` checks it.
Nothing is imported here, so that `import sdmesh.spec` stays light.
"""
