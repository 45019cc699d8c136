"""TLS for the internal gRPC hop, draft worker → verifier: certificates from the config.

Verifiers serve with `cert_file`/`key_file`; draft workers trust `ca_file`. Verifiers advertise an IP
address (the node's, in a cluster), so `server_name` names the host the certificate was issued for
and every verifier can share one certificate whatever its IP.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict


class InternalTls(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str  # the verifiers' certificate chain (PEM)
    key_file: str  # its private key (PEM)
    ca_file: str  # what draft workers trust (PEM): the CA, or the self-signed certificate itself
    server_name: str | None = None  # the certificate's host name; None: the advertised address

    # The files are read where they are used (each replica), not here: the config is also built
    # on machines that only render it (the Helm chart's serveConfigV2).
    def server_credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_file).read_bytes())

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
