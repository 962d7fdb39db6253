"""docs/vps.md, run: every command of the page, in its order, against two Pebble CAs standing in
for Let's Encrypt's staging and production directories, so that the page cannot rot.

What the page marks:
- every ```sh block is run line by line (a line is one command; `sudo` and `sudo -u tlsproxy`
  are dropped, the test runs as whoever runs it);
- a ```toml or ```python block under `<!-- file: PATH -->` is written to PATH.
Any other fenced block must be ```text (sample output, not run).

What the test changes (_rewrite, _command and _write_file below):
- /opt, /srv, /etc, /var/lib, /var/backups and /tmp move under the test's temporary directory;
- app.example.com becomes app.test (and example.com the zone test.), which the test's named
  resolves to 127.0.0.1, for Pebble and for `dig`;
- Let's Encrypt's staging and production directory URLs become the two Pebbles' (each with its
  own root), and the staging account's directory name follows;
- the listeners become 127.0.0.1 ports: https a free one, http the port the Pebbles validate on;
- `ca_bundle` (Pebble's own HTTPS CA) is added to [acme];
- the commands run in a directory holding a copy of this checkout as ./tlsproxy;
- curl and openssl reach app.test on the proxy's port; a curl without --cacert trusts the
  production Pebble's root, the staging roots are fetched from the staging Pebble.
Commands that cannot run here are in NOT_RUN with the reason; systemctl start/stop/reload and
journalctl are done to the proxy process and its log file directly (EQUIVALENTS). The pip
installs are real (about 20 s of the test's 30-40 s): the page's own venvs, from the index.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from certs.issuers.acme import directory_slug
from certs.storage import safe_name
from tests.integration.harness import REPO, free_port

from .conftest import Components

DOC = REPO / "docs" / "vps.md"
STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"

# Lines of the page that cannot run in a test, and why. Each must match a line of the page.
NOT_RUN = {
    r"^sudo apt-get ": "installs packages on the machine (scripts/test.sh installs what the "
    "test needs: python3-venv, curl, dig)",
    r"^sudo useradd ": "creates a system user; the test runs every command as its own user",
    r"^sudo ufw ": "changes the machine's firewall",
    r"^sudo systemctl daemon-reload$": "no systemd here; the unit is not loaded",
    r"^sudo journalctl -u tlsproxy -f$": "follows the journal forever; the test reads the "
    "proxy's log file",
}
# systemd's actions, done to the process (what the unit's ExecStart/ExecReload/stop do).
EQUIVALENTS = {
    r"^sudo systemctl (enable --now|start) tlsproxy$": "start",
    r"^sudo systemctl reload tlsproxy$": "reload",
    r"^sudo systemctl stop tlsproxy$": "stop",
    r"^sudo journalctl -u tlsproxy \| ": "journal",
}

FENCE = re.compile(r"^```(\w*)\s*$")
FILE_MARK = re.compile(r"^<!-- file: (\S+) -->$")


@dataclass
class Block:
    lang: str
    lines: list[str]
    file: str | None
    line_no: int


def doc_blocks(text: str) -> list[Block]:
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, lang = i, match.group(1)
        mark = FILE_MARK.match(lines[i - 1]) if i > 0 else None
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append(Block(lang, body, mark.group(1) if mark else None, start + 1))
        i += 1
    return blocks


def commands(block: Block) -> list[str]:
    return [line.strip() for line in block.lines if line.strip() and not line.startswith("#")]


def test_every_block_of_the_page_is_run_or_written_or_sample_output() -> None:
    """Runs without Pebble: the page's shape is what the walkthrough test relies on."""
    blocks = doc_blocks(DOC.read_text())
    assert blocks
    for block in blocks:
        where = f"docs/vps.md:{block.line_no}"
        if block.lang == "sh":
            assert block.file is None, where
        elif block.lang in ("toml", "python"):
            assert block.file is not None, f"{where}: a {block.lang} block needs <!-- file: -->"
        else:
            assert block.lang == "text", f"{where}: ```{block.lang} is neither run nor sample"
    lines = [c for b in blocks if b.lang == "sh" for c in commands(b)]
    for pattern in [*NOT_RUN, *EQUIVALENTS]:
        assert any(re.search(pattern, line) for line in lines), f"no line of the page: {pattern}"


def test_the_page_names_the_account_directories_the_code_uses() -> None:
    text = DOC.read_text()
    for url in (STAGING, PRODUCTION):
        slug = safe_name(directory_slug(url))
        assert f"acme/{slug}/" in text, f"docs/vps.md should name acme/{slug}/ for {url}"


# -- the walkthrough ---------------------------------------------------------------------------


@dataclass
class Walk:
    root: Path
    staging: Components
    production: Components
    https_port: int
    http_port: int
    home: Path  # where the commands run: the page's checkout is ./tlsproxy there
    staging_root: Path
    production_root: Path
    proxy: subprocess.Popen | None = None
    log_offset: int = 0
    phase: str = "staging"
    failed_order: bool = False  # section 12 made an order fail on purpose
    outputs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    # -- paths ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "var/lib/tlsproxy"

    @property
    def config(self) -> Path:
        return self.root / "etc/tlsproxy/tlsproxy.toml"

    @property
    def log_file(self) -> Path:
        return self.root / "tlsproxy.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> str:
        """The first match of `pattern` in the log written since the last mark."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.log(), self.log_offset)
            if match:
                return match.group(0)
            if self.proxy is not None and self.proxy.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log()[-4000:]}")

    def mark(self) -> None:
        self.log_offset = len(self.log())

    # -- the proxy process: what systemd would do ---------------------------------------------
    def start(self) -> None:
        assert self.proxy is None
        self.mark()
        with self.log_file.open("ab") as log, (self.root / "access.log").open("ab") as out:
            self.proxy = subprocess.Popen(
                [str(self.root / "opt/tlsproxy/bin/tlsproxy"), "run", "-c", str(self.config)],
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # its workers too can be found and stopped
            )
        self.wait_for_log(r"listening https://")

    def reload(self) -> None:
        assert self.proxy is not None
        self.mark()
        self.proxy.send_signal(signal.SIGHUP)
        self.wait_for_log(r"reloaded .*: 1 site")

    def stop(self) -> None:
        if self.proxy is None:
            return
        proc, self.proxy = self.proxy, None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its group: a worker left behind, if any
        proc.wait(5)
        assert proc.returncode == 0, self.log()[-3000:]


SUBSTITUTE_PATHS = re.compile(
    r"(?<![\w./-])(/opt|/srv|/etc|/var/lib|/var/backups|/tmp)(?=[/\s'\"]|$)"
)


def _rewrite(walk: Walk, text: str) -> str:
    """A line or a file of the page, as it runs here."""
    s, p = walk.staging, walk.production
    text = text.replace(STAGING, s.directory).replace(PRODUCTION, p.directory)
    text = text.replace(
        "acme-staging-v02.api.letsencrypt.org-", f"{safe_name(directory_slug(s.directory))[:-10]}"
    )
    text = re.sub(r"\bapp\.example\.com:443\b", f"127.0.0.1:{walk.https_port}", text)
    text = re.sub(r"\bapp\.example\.com\b", "app.test", text)
    text = re.sub(r"(?<![\w@.-])example\.com\b", "test", text)
    return SUBSTITUTE_PATHS.sub(lambda m: f"{walk.root}{m.group(1)}", text)


def _command(walk: Walk, original: str) -> str:
    """A line of the page as it runs here: the page's names rewritten first, then the test's
    own files and ports put in (they live under /tmp, which the first step would move)."""
    line = re.sub(r"^sudo (-u tlsproxy )?", "", original)
    line = line.replace("-o tlsproxy -g tlsproxy ", "")
    line = _rewrite(walk, line)
    line = re.sub(r"\bpip install (?=[\w.])", "pip install --quiet ", line)
    if line.startswith("dig "):
        line = f"dig -p {walk.staging.dns_port} @127.0.0.1 " + line[4:]
    if "letsencrypt.org/certs/staging/" in line:
        # Let's Encrypt's staging roots: the staging Pebble's (from its management API).
        line = re.sub(
            r"https://letsencrypt\.org/certs/staging/\S+( https://letsencrypt\.org/\S+)*",
            f"--cacert {walk.staging.tls.ca} https://127.0.0.1:{walk.staging.mgmt_port}/roots/0",
            line,
        )
    elif line.startswith("curl ") and "http://app.test/" in line:
        line = line.replace("curl ", f"curl --resolve app.test:{walk.http_port}:127.0.0.1 ", 1)
        line = line.replace("http://app.test/", f"http://app.test:{walk.http_port}/")
    elif line.startswith("curl ") and "https://app.test/" in line:
        if "--cacert" not in line:  # the system's trust store: here, production Pebble's root
            line = line.replace("curl ", f"curl --cacert {walk.production_root} ", 1)
        line = line.replace("curl ", f"curl --resolve app.test:{walk.https_port}:127.0.0.1 ", 1)
        line = line.replace("https://app.test/", f"https://app.test:{walk.https_port}/")
    return line


def _write_file(walk: Walk, block: Block) -> None:
    assert block.file is not None
    path = Path(_rewrite(walk, block.file))
    text = _rewrite(walk, "\n".join(block.lines) + "\n")
    if block.file == "/etc/tlsproxy/tlsproxy.toml":
        text, n = re.subn(r"(?m)^https = .*$", f'https = ["127.0.0.1:{walk.https_port}"]', text)
        assert n == 1, "the config's https line changed"
        text, n = re.subn(r"(?m)^http = .*$", f'http = ["127.0.0.1:{walk.http_port}"]', text)
        assert n == 1, "the config's http line changed"
        text, n = re.subn(r"(?m)^(email = .*)$", rf'\1\nca_bundle = "{walk.staging.tls.ca}"', text)
        assert n == 1, "the config's [acme] email line changed"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run(walk: Walk, original: str, line: str) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=walk.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"docs/vps.md: {original}\nran: {line}\nexit {result.returncode}\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}\nproxy log:\n{walk.log()[-3000:]}"
    )
    walk.outputs.append((original, result.stdout))
    return result.stdout


def _serial_served(walk: Walk, root: Path) -> int:
    """The serial of the leaf the proxy serves for app.test, checked against `root`."""
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(root))
    with contextlib.closing(
        ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", walk.https_port), timeout=10),
            server_hostname="app.test",
        )
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def _intermediate_cn(c: Components) -> str:
    ctx = ssl.create_default_context(cafile=str(c.tls.ca))
    url = f"https://127.0.0.1:{c.mgmt_port}/intermediates/0"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
        pem = response.read()
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()


def _copy_checkout(to: Path) -> Path:
    """What the page uses of a checkout (pip install, the systemd unit), without this one's
    venv or build leftovers."""
    to.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "conf.example.toml"):
        shutil.copy(REPO / name, to / name)
    for package in ("proxy", "certs", "deploy"):
        shutil.copytree(REPO / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    return to


@pytest.fixture
def walk(components, tmp_path: Path) -> Walk:
    for tool in ("curl", "openssl", "dig", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/test.sh installs it)")
    staging = components()
    # Both CAs validate http-01 on the same port, the proxy's http listener; each has its own
    # named (same zone) and generates its own root.
    production = components(extra_config={"httpPort": staging.http_port})
    # A short root, as /var/lib is on a VPS: `tlsproxy check` refuses a data_dir whose worker
    # sockets could pass the kernel's 107 bytes, and pytest's tmp_path is deep.
    root = Path(tempfile.mkdtemp(prefix="vps-", dir="/tmp"))
    for d in ("opt", "srv", "etc/systemd/system", "var/lib", "var/backups", "tmp"):
        (root / d).mkdir(parents=True)
    roots = []
    for name, c in (("staging", staging), ("production", production)):
        path = tmp_path / f"{name}-root.pem"
        path.write_bytes(c.root_pem())
        roots.append(path)
    w = Walk(
        root=root,
        staging=staging,
        production=production,
        https_port=free_port(),
        http_port=staging.http_port,
        home=_copy_checkout(tmp_path / "home/tlsproxy").parent,
        staging_root=roots[0],
        production_root=roots[1],
    )
    try:
        yield w
    finally:
        w.stop()
        shutil.rmtree(root, ignore_errors=True)


def _match(table: dict[str, str], line: str) -> str | None:
    return next((value for pattern, value in table.items() if re.search(pattern, line)), None)


def test_the_vps_walkthrough_runs_from_install_to_production_and_restore(walk: Walk) -> None:
    issuers = {"staging": _intermediate_cn(walk.staging)}
    issuers["production"] = _intermediate_cn(walk.production)
    assert issuers["staging"] != issuers["production"]
    served: dict[str, int] = {}

    for block in doc_blocks(DOC.read_text()):
        if block.file is not None:
            _write_file(walk, block)
            continue
        if block.lang != "sh":
            continue
        for original in commands(block):
            reason = _match(NOT_RUN, original)
            if reason is not None:
                walk.skipped.append((original, reason))
                continue
            action = _match(EQUIVALENTS, original)
            if action == "start" and "backup" not in served:
                walk.start()
                walk.wait_for_log(r"serving certificate [0-9a-f]+ for app\.test")
            elif action == "start":
                walk.start()
                _check_restored(walk, served["backup"])
            elif action == "reload":
                walk.reload()
                walk.wait_for_log(r"serving certificate [0-9a-f]+ for app\.test")
            elif action == "stop":
                walk.stop()
                served["backup"] = _serial_from_files(walk)
                # The page restores after a stop: the disk is lost, only the backup is left.
                shutil.rmtree(walk.data_dir)
            elif action == "journal":
                _cause_a_failed_order(walk)
                line = _command(walk, original).replace(
                    "journalctl -u tlsproxy", f"cat {walk.log_file}"
                )
                out = _run(walk, original, line)
                assert re.search(
                    r"WARNING tlsproxy\.certs\.acme: ACME order for app\.test failed \(attempt 1; "
                    r"still serving serial [0-9a-f]+ until .*\): app\.test: ",
                    out,
                ), out
            else:
                out = _run(walk, original, _command(walk, original))
                _check(walk, original, out, issuers, served)

    # The page's sample output (```text blocks) is what the program printed and logged.
    seen = walk.log() + "".join(out for _, out in walk.outputs)
    for block in doc_blocks(DOC.read_text()):
        for sample in block.lines if block.lang == "text" else []:
            assert re.search(_sample_pattern(walk, sample), seen), f"docs/vps.md: {sample}"
    assert walk.failed_order, "section 12 never ran"
    assert "backup" in served and walk.proxy is not None, "the page never restored"
    assert len(walk.outputs) >= 25, [o for o, _ in walk.outputs]


def _sample_pattern(walk: Walk, sample: str) -> str:
    """A line of sample output as a pattern: "..." stands for anything; the staging CA's
    "(STAGING)" names are Pebble's here."""
    text = _rewrite(walk, sample.replace("(STAGING) ", ""))
    return re.escape(text).replace(r"\.\.\.", ".*?")


def _settled(directory: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until nothing in `directory` has changed for `quiet` seconds: the renewal's last
    state write is done (the page says a backup taken during one must be taken again)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        newest = max(p.stat().st_mtime for p in directory.iterdir())
        if time.time() - newest >= quiet:
            return
        time.sleep(0.1)
    raise AssertionError(f"{directory} kept changing for {limit}s")


def _check_restored(walk: Walk, serial: int) -> None:
    """The proxy starts on the restored account and certificate: the same leaf, no order."""
    assert _serial_served(walk, walk.production_root) == serial
    time.sleep(1.0)  # time for its ACME task to decide; it must find nothing due
    assert "ordering a certificate" not in walk.log()[walk.log_offset :], walk.log()[-3000:]
    kept = [p for d in ("acme", "certificates") for p in (walk.data_dir / d).rglob("*")]
    for path in [walk.data_dir, *kept]:  # the modes the page's table gives
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        elif path.name.endswith((".key", ".pem", ".json")):
            assert mode == 0o600, (path, oct(mode))


def _serial_from_files(walk: Walk) -> int:
    from cryptography import x509

    chain = (walk.data_dir / "certificates/app.test/cert.pem").read_bytes()
    return x509.load_pem_x509_certificate(chain).serial_number


def _cause_a_failed_order(walk: Walk) -> None:
    """Section 12 reads a failed order from the log: make one, as DNS pointing nowhere would
    (the production Pebble resolves names only through its named)."""
    c = walk.production
    assert c.named is not None
    c.named.terminate()
    c.named.wait(10)
    c.named = None
    renew = _command(
        walk,
        "sudo -u tlsproxy /opt/tlsproxy/bin/tlsproxy certs renew app.example.com "
        "-c /etc/tlsproxy/tlsproxy.toml",
    )
    # Pebble may still hand out the authorization of the last order as already valid (seen in
    # CI, one run in four, PEBBLE_AUTHZREUSE=0 notwithstanding): that order needs no DNS and
    # succeeds. A few renewals later one asks for a challenge, and fails.
    for _ in range(4):
        walk.mark()
        _run(walk, "(section 12: a renewal that fails)", renew)
        outcome = walk.wait_for_log(
            r"ACME order for app\.test failed|serving certificate [0-9a-f]+ for app\.test"
        )
        if "failed" in outcome:
            break
    else:
        raise AssertionError("four renewals in a row reused a valid authorization")
    walk.failed_order = True


def _check(walk: Walk, original: str, out: str, issuers: dict[str, str], served: dict) -> None:
    """What the page says each command shows."""
    roots = {"staging": walk.staging_root, "production": walk.production_root}
    if original == "dig +short app.example.com A":
        assert out.split() == ["127.0.0.1"], out
    elif original.endswith("tlsproxy --version"):
        assert out.startswith("tlsproxy "), out
    elif "tlsproxy status" in original:
        assert "app.test" in out and issuers[walk.phase] in out, out
    elif "tlsproxy check" in original:
        assert "app.test" in out, out
    elif original.startswith("curl -sSI http://"):
        assert out.startswith("HTTP/1.1 308"), out
        assert f"https://app.test:{walk.https_port}/" in out, out
    elif original.startswith("curl -sS") and "app.example.com" in original:
        assert out.strip() == '{"hello":"world"}', out
    elif "openssl s_client" in original:
        cn = issuers[walk.phase].removeprefix("CN=")
        assert re.search(rf"issuer=.*{re.escape(cn)}", out), (walk.phase, cn, out)
        served[walk.phase] = _serial_served(walk, roots[walk.phase])
        if walk.phase == "production":  # and the staging root no longer verifies it
            with pytest.raises(ssl.SSLCertVerificationError):
                _serial_served(walk, walk.staging_root)
    elif original.startswith("sudo install -m 644"):
        unit = walk.root / "etc/systemd/system/tlsproxy.service"
        assert "ExecStart=" in unit.read_text()
    elif original.startswith("sudo sed -i"):
        walk.phase = "production"
    elif original.startswith("sudo rm -r") and "/acme/" in original:
        assert not any(walk.data_dir.glob("acme/127.0.0.1_*")), "the staging account is left"
    elif "tlsproxy certs renew" in original:
        assert "requested" in out, out
        walk.mark()
        walk.wait_for_log(r"serving certificate [0-9a-f]+ for app\.test")
        assert _serial_served(walk, walk.production_root) != served["production"]
        _settled(walk.data_dir / "certificates/app.test")
    elif "tlsproxy certs -c" in original:
        line = next(line for line in out.splitlines() if line.startswith("app.test "))
        if walk.failed_order:
            assert "last_error=app.test: authorization invalid: http-01: urn:ietf:" in line, line
        else:
            assert f"issuer={issuers[walk.phase]}" in line and "last_error=-" in line, line
    elif original.startswith("sudo tar -tzvf"):
        assert "tlsproxy/certificates/app.test/key.pem" in out, out
        assert "control.sock" not in out and "/run/" not in out, out
        assert re.search(r"-rw------- .*tlsproxy/acme/.*/account\.key", out), out
