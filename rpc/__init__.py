"""The RPC layer every daemon and client shares: mutual TLS identities, method
permissions carried in certificates, server setup (health, reflection) and
chunked streams, plus the command-line plumbing common to every program."""
