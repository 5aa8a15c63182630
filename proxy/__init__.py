"""pg-tls-sidecar: plaintext PostgreSQL in on localhost, verified TLS out to a managed server."""

__version__ = "0.1.0"
