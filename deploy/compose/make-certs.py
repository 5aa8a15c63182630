"""Make the compose demo's throwaway PKI: root -> intermediate -> server certificate "postgres".

Run once by the ``certs`` service (the sidecar image, as root) into the shared ``certs`` volume:

  ca.cer       the root, DER-encoded like the .cer files Azure publishes; the sidecar's sslrootcert
  server.crt   leaf then intermediate (what PostgreSQL's ssl_cert_file should hold)
  server.key   root-owned, group postgres (gid 999), mode 0640: what PostgreSQL accepts

Existing files are kept, so restarts do not change the server's identity.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from proxy.demo.pki import CertificateAuthority

POSTGRES_GID = 999  # the postgres group in the official postgres images (Debian variants)
SERVER_NAME = "postgres"  # the compose service name the sidecar dials and verifies


def make(directory: Path) -> bool:
    """Write the files unless a complete set exists; returns whether anything was written."""
    names = ("ca.cer", "server.crt", "server.key")
    if all((directory / name).is_file() for name in names):
        return False
    root = CertificateAuthority.create("pg-tls-sidecar compose demo root CA")
    issuing = root.issue_intermediate("pg-tls-sidecar compose demo issuing CA")
    server = issuing.issue_server(
        common_name=SERVER_NAME, dns_names=(SERVER_NAME,), ip_addresses=()
    )
    server.write(directory, "server", key_mode=0o640, fullchain=True)
    (directory / "ca.cer").write_bytes(root.cert_der())
    if os.geteuid() == 0:
        os.chown(directory / "server.key", 0, POSTGRES_GID)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")
    wrote = make(target)
    print(f"make-certs: {'wrote' if wrote else 'kept'} ca.cer, server.crt, server.key in {target}")
