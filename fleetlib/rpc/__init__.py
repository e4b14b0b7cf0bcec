"""The RPC transport every daemon and client shares: mutual TLS identities, method
permissions carried in certificates, server setup (health, reflection), chunked
streams and object streams."""
