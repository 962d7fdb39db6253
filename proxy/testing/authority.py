"""One local CA shared by several test proxies (the `tlsproxy_ca` fixture).

A proxy keeps its local CA in data_dir/ca. A CertificateAuthority is such a directory made once,
whose four files are copied into each proxy's data_dir before it starts: every proxy then
issues from the same root and intermediate, so one trust anchor (`ca_file`) covers them all.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

from certs.storage import CERT_MODE, KEY_MODE, Storage


class CertificateAuthority:
    def __init__(self, directory: str | Path) -> None:
        """Use the local CA kept in `directory` (its ca/ subdirectory), creating it if missing."""
        from certs.issuers.local_ca import LocalCA

        self.directory = Path(directory)
        self._storage = Storage(self.directory)
        LocalCA.load_or_create(self._storage)

    @property
    def ca_file(self) -> Path:
        """The root certificate (PEM): what clients trust."""
        return self._storage.ca_files().root_cert

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def install(self, data_dir: str | Path) -> None:
        """Make the proxy that will run on `data_dir` issue from this CA."""
        target = Storage(Path(data_dir)).ca_files()
        source = self._storage.ca_files()
        for name, mode in (
            ("root_cert", CERT_MODE),
            ("root_key", KEY_MODE),
            ("intermediate_cert", CERT_MODE),
            ("intermediate_key", KEY_MODE),
        ):
            path: Path = getattr(target, name)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copyfile(getattr(source, name), path)
            path.chmod(mode)
