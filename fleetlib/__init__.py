"""What every component of the fleet shares: errors, the wire contract (generated
protobuf modules and the tree codec), the pure tree library, the RPC transport,
the CLI plumbing, the SQL engine and migration runner, and test helpers.

One distinctive top-level name, so that installing the project never shadows a
generic package (`proto`, `rpc`) of another distribution in the same environment.
"""
