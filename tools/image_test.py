"""``make image-test``: build the container image from HEAD and run it the way production does.

1. Exports HEAD (``git archive``: a clean checkout, not the working tree) and starts a private ``dockerd`` on its own
   socket and data directory in a temporary directory (``--iptables=false --bridge=none``; containers use the host's
   network namespace and only loopback traffic is sent).
2. Base image: the tag the Dockerfile's ``FROM`` names (``python:3.11-slim-bookworm``). Nothing is pulled: unless
   ``--pull`` is given, it is made locally with ``debootstrap`` (Debian bookworm from the mirror apt uses) plus Debian's
   Python 3.11 where the official image has its Python (``/usr/local/bin``), imported under that tag. The root
   filesystem is cached (``~/.cache/cdc-service/image-test``) so later runs on the same machine import it in seconds.
3. Builds the image (BuildKit) through a local HTTPS proxy of PyPI, with ``PIP_INDEX_URL``, ``PIP_TRUSTED_HOST`` and
   ``EXTRA_CA_CERTS`` (a throwaway CA that signed the proxy's certificate): the private-index path of the Dockerfile,
   end to end. Prints the build time and the image size.
4. Checks the image: no ``/wheels``, no compiler, the build arguments and the CA in neither its files nor its
   history; ``--help`` and ``config`` work with ``--read-only``; the service, read-only with all capabilities dropped,
   answers ``/readyz`` against a nats-server and a redis-server started for the test on free loopback ports, runs as
   uid/gid 10001, and ``docker stop`` (SIGTERM, the image's STOPSIGNAL) ends it with status 0 within the grace period.

Every process and container it starts is stopped by its pid or id; the temporary directory is removed, except its
logs when a check fails. Needs root, Debian's ``docker.io`` and ``debootstrap`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.localservers import NatsServer, RedisServer, free_port  # noqa: E402
from tools.polling import GiveUp, wait_for  # noqa: E402

IMAGE = "cdc-service:image-test"
GRACE_SECONDS = 10
# The base image made locally: what the official python:3.11-slim-bookworm has that the Dockerfile relies on (python,
# pip and setuptools in /usr/local, no EXTERNALLY-MANAGED marker, CA certificates, groupadd/useradd, an empty /mnt).
# Debian disables ensurepip for its python, so pip is installed from the wheel python3-venv ships, by running it.
# Changing this recipe changes the cache key.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ["ca-certificates", "netbase", "tzdata", "python3", "python3-venv"]
BASE_SETUP = """set -eu
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
wheels=/usr/share/python-wheels
pip_wheel=$(echo $wheels/pip-*.whl)
python3.11 $pip_wheel/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \\
    --root-user-action=ignore --no-warn-script-location $pip_wheel $wheels/setuptools-*.whl
ln -sf /usr/bin/python3.11 /usr/local/bin/python3.11
ln -sf python3.11 /usr/local/bin/python3
ln -sf python3 /usr/local/bin/python
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt /root/.cache
"""
BASE_CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]


class CheckFailed(Exception):
    pass


class GaveUp(CheckFailed, GiveUp):
    """A check failed while polling for it: the wait ends at once (GiveUp) and ``main`` reports it (CheckFailed)."""


def say(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(args: list[str], *, env: dict[str, str] | None = None, check: bool = True, **kw: Any) -> str:
    result = subprocess.run(args, check=False, env=env, capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise CheckFailed(
            f"{' '.join(args[:4])}... exited {result.returncode}: {(result.stderr or result.stdout)[-3000:]}"
        )
    return result.stdout


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    say(f"ok   {message}")


# --- the private dockerd ------------------------------------------------------------------------------------------


class Dockerd:
    """A dockerd of our own: socket, data and exec root under ``root``; stopped by its pid."""

    def __init__(self, root: Path, dockerd: str, cli: str):
        self.root = root
        self.dockerd = dockerd
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "1",
            "DOCKER_CONFIG": str(root / "cli"),
        }
        self.cli = cli

    def start(self) -> None:
        args = [self.dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec")]
        args += ["--host", f"unix://{self.socket}", "--pidfile", str(self.root / "dockerd.pid")]
        args += ["--iptables=false", "--bridge=none", "--log-level=warn"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise GaveUp(f"dockerd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return self.succeeds("version")

        wait_for(up, 60, 0.2, what="dockerd answering")
        say(f"private dockerd pid {self.proc.pid if self.proc else '?'} on {self.socket}")

    def succeeds(self, *args: str) -> bool:
        return subprocess.run([self.cli, *args], check=False, env=self.env, capture_output=True).returncode == 0

    def __call__(self, *args: str, check: bool = True, **kw: Any) -> str:
        return run([self.cli, *args], env=self.env, check=check, **kw)

    def logs(self, container: str) -> str:
        """The container's stdout and stderr, interleaved."""
        command = [self.cli, "logs", container]
        result = subprocess.run(command, check=False, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return result.stdout.decode(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        containerd_pid = self.root / "exec" / "containerd" / "containerd.pid"
        child = int(containerd_pid.read_text()) if containerd_pid.exists() else None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                # dockerd stops the containerd it started, unless it was killed: then that one is ours to stop,
                # if the pid still names it (its command line holds our exec root).
                with contextlib.suppress(OSError):
                    if child is not None and str(self.root) in Path(f"/proc/{child}/cmdline").read_text():
                        os.kill(child, signal.SIGTERM)
        self.proc = None


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -r, after unmounting whatever is still mounted below ``path`` (dockerd's overlays after an unclean stop,
    debootstrap's /proc and /sys after a failure); refuses while anything is, so a host directory is never removed
    through a bind mount."""
    for mount in _mounts_below(path):
        subprocess.run(["umount", "-l", mount], check=False)
    left = _mounts_below(path)
    if left:
        say(f"not removing {path}: still mounted below it: {left}")
        return
    shutil.rmtree(path, ignore_errors=True)


# --- the base image -----------------------------------------------------------------------------------------------


def dockerfile_base() -> str:
    """The image the Dockerfile's first FROM names, a build argument's default resolved."""
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", text, re.M)
    if not match:
        raise CheckFailed("the Dockerfile has no FROM")
    image = match.group(1)
    for name, default in re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M):
        image = image.replace(f"${{{name}}}", default).replace(f"${name}", default)
    if "$" in image:
        raise CheckFailed(f"cannot resolve the base image {image!r}: give its build argument a default")
    return image


def debian_mirror() -> str:
    """The mirror apt already uses for bookworm (deb822 or one-line sources), else deb.debian.org."""
    sources = [*sorted(Path("/etc/apt").glob("sources.list.d/*.sources")), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.exists():
            continue
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and BASE_SUITE in suites.group(1).split():
                return uris.group(1)
        match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{BASE_SUITE}\s", text, re.M)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs(cache: Path, workdir: Path) -> tuple[Path, bool]:
    """The base root filesystem as a tar file in ``cache`` (made with debootstrap on a miss); (path, was it cached)."""
    recipe = json.dumps([BASE_SUITE, BASE_PACKAGES, BASE_SETUP, BASE_CHANGES]).encode()
    tar_path = cache / f"python-3.11-slim-{BASE_SUITE}-{hashlib.sha256(recipe).hexdigest()[:12]}.tar"
    if tar_path.exists():
        return tar_path, True
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise CheckFailed("no base image and no debootstrap to make one: apt-get install debootstrap")
    rootfs = workdir / "rootfs"
    mirror = debian_mirror()
    say(f"debootstrap {BASE_SUITE} from {mirror} (a few minutes; cached for later runs)")
    args = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, str(rootfs), mirror]
    run(args, timeout=1200)
    run(["chroot", str(rootfs), "/bin/sh", "-c", BASE_SETUP], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    cache.mkdir(parents=True, exist_ok=True)
    partial = tar_path.with_suffix(f".{os.getpid()}.partial")
    excludes = [f"--exclude=./{d}/*" for d in ("dev", "proc", "sys", "run", "tmp")]
    run(["tar", "--numeric-owner", "-C", str(rootfs), *excludes, "-cf", str(partial), "."])
    os.replace(partial, tar_path)
    remove_tree(rootfs)
    return tar_path, False


def provide_base(docker: Dockerd, tag: str, cache: Path, workdir: Path, pull: bool) -> None:
    if docker.succeeds("image", "inspect", tag):
        say(f"base image {tag}: present in the daemon")
        return
    if pull:
        docker("pull", tag, timeout=600)
        say(f"base image {tag}: pulled")
        return
    tar_path, cached = base_rootfs(cache, workdir)
    changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
    docker("import", *changes, str(tar_path), tag)
    version = docker(
        "run", "--rm", "--network", "none", tag, "python", "-c", "import sys; print(sys.version.split()[0])"
    )
    say(
        f"base image {tag}: NOT the official image, no registry used: made locally with debootstrap "
        f"(Debian {BASE_SUITE}, Python {version.strip()} in /usr/local/bin), "
        f"{'from the cache ' if cached else 'cached as '}{tar_path}"
    )


# --- a private index: PyPI behind a local HTTPS proxy signed by a throwaway CA ------------------------------------


def throwaway_ca(workdir: Path) -> tuple[str, Path, Path]:
    """(CA certificate PEM, server certificate file, server key file) for 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            import ipaddress

            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdc-service image-test CA")])
    ca_cert = certificate("cdc-service image-test CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("127.0.0.1", key, ca_cert.subject, ca_key, False)
    cert_path, key_path = workdir / "index.crt", workdir / "index.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_cert.public_bytes(serialization.Encoding.PEM).decode(), cert_path, key_path


@contextlib.contextmanager
def pypi_proxy(cert: Path, key: Path, upstream: str, requested: list[str]) -> Iterator[str]:
    """An HTTPS simple index on a free loopback port that relays the project pages of ``upstream`` (a simple index
    URL ending in ``/``; its file links point at its own file host). Yields its URL; appends each requested path to
    ``requested``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                project = self.path.removeprefix("/simple/")
                request = urllib.request.Request(upstream + project, headers={"Accept": "text/html"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    body, status = response.read(), response.status
                    content_type = response.headers.get("Content-Type", "text/html")
            except urllib.error.HTTPError as exc:
                body, status, content_type = exc.read(), exc.code, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="pypi-proxy", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def machine_cas() -> list[str]:
    """The CA certificates this machine added to its own bundle (Debian: /usr/local/share/ca-certificates), e.g. of
    a TLS-intercepting egress proxy: the builder needs them too to reach the index's file host."""
    found = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if found:
        say(f"EXTRA_CA_CERTS also carries this machine's own CA certificates: {', '.join(p.name for p in found)}")
    return [path.read_text() for path in found]


# --- the checks ---------------------------------------------------------------------------------------------------


def export_contains(docker: Dockerd, needles: dict[str, bytes]) -> dict[str, str]:
    """Which of ``needles`` (label -> bytes) some file of the image contains: label -> path."""
    container = docker("create", IMAGE).strip()
    found: dict[str, str] = {}
    try:
        proc = subprocess.Popen([docker.cli, "export", container], env=docker.env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle else b""
                for label, needle in needles.items():
                    if needle in data:
                        found.setdefault(label, member.name)
        proc.wait(timeout=60)
    finally:
        docker("rm", "-f", container, check=False)
    return found


def check_contents(docker: Dockerd, ca_pem: str, trusted_host: str) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    say(f"image size: {size / 1e6:.0f} MB ({size} bytes)")
    probe = (
        "import os, shutil, json; print(json.dumps({'wheels': os.path.exists('/wheels'), 'mnt': os.listdir('/mnt'),"
        " 'compilers': [c for c in ('cc', 'gcc', 'c++', 'g++', 'clang', 'x86_64-linux-gnu-gcc') if shutil.which(c)],"
        " 'pip_in_venv': os.path.exists('/opt/venv/bin/pip')}))"
    )
    facts = json.loads(
        docker("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", IMAGE, "-c", probe)
    )
    expect(not facts["wheels"] and not facts["mnt"], "no /wheels directory and nothing in /mnt")
    expect(not facts["compilers"], f"no compiler in the runtime image (found: {facts['compilers'] or 'none'})")
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE)
    ca_body = "".join(ca_pem.strip().splitlines()[1:-1])[:64]
    leaks = [
        what for what, text in (("EXTRA_CA_CERTS", ca_body), ("PIP_TRUSTED_HOST", trusted_host)) if text in history
    ]
    expect(not leaks, f"the build arguments are not in the image history (leaked: {leaks or 'none'})")
    ca_line = ca_pem.strip().splitlines()[1].encode()
    found = export_contains(docker, {"build-time CA": ca_line, "PIP_TRUSTED_HOST": trusted_host.encode()})
    expect(not found, f"no file of the image holds the build-time CA or index settings (found: {found or 'none'})")


def check_commands(docker: Dockerd, source: Path, nats_url: str, redis_url: str) -> None:
    base = ["run", "--rm", "--read-only", "--cap-drop", "ALL", "--network", "host"]
    help_text = docker(*base, IMAGE, "--help")
    expect("usage: python -m cdc_service" in help_text, "`--help` prints the usage (read-only root)")
    version = re.search(r'^__version__ = "([^"]+)"', (source / "cdc_service" / "__init__.py").read_text(), re.M)
    printed = docker(*base, IMAGE, "--version").strip()
    expect(bool(version) and printed.endswith(f" {version.group(1) if version else '?'}"), f"`--version`: {printed}")
    env = ["-e", f"CDC_NATS__URL={nats_url}", "-e", f"CDC_REDIS__URL={redis_url}"]
    config = json.loads(docker(*base, *env, IMAGE, "config"))
    # The URL as given, whether the setting holds one server or a list.
    expect(nats_url in json.dumps(config["nats"]["url"]), "`config` prints the settings with the CDC_* overrides")
    bad = subprocess.run(
        [docker.cli, *base, "-e", "CDC_HTTP__PORT=not-a-port", IMAGE, "config"],
        check=False,
        env=docker.env,
        capture_output=True,
        text=True,
    )
    expect(bad.returncode == 2 and "http" in bad.stderr.lower(), "a bad setting exits 2 naming the key")


def check_service(docker: Dockerd, nats_url: str, redis_url: str, logs: Path) -> None:
    http_port = free_port()
    env = {
        "CDC_NATS__URL": nats_url,
        "CDC_REDIS__URL": redis_url,
        "CDC_HTTP__HOST": "127.0.0.1",
        "CDC_HTTP__PORT": str(http_port),
        "CDC_SHUTDOWN__GRACE_SECONDS": str(GRACE_SECONDS),
    }
    args = ["run", "-d", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host"]
    args += [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
    container = docker(*args, IMAGE).strip()
    try:
        started = time.monotonic()

        def ready_or_exited() -> str | None:
            if docker("inspect", "-f", "{{.State.Running}}", container).strip() != "true":
                return "exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as response:
                    return "ready" if response.status == 200 else None
            except (urllib.error.URLError, OSError):
                return None

        if wait_for(ready_or_exited, 60, 0.1, what="/readyz 200") == "exited":
            raise CheckFailed(f"the container exited: {docker.logs(container)[-3000:]}")
        expect(True, f"/readyz 200 after {time.monotonic() - started:.1f} s (read-only root, no capabilities)")
        pid = docker("inspect", "-f", "{{.State.Pid}}", container).strip()
        status = Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M)
        ids = (uid.group(1) if uid else "?", gid.group(1) if gid else "?")
        expect(ids == ("10001", "10001"), f"the service runs as uid/gid {ids[0]}/{ids[1]}")
        started = time.monotonic()
        docker("stop", "--time", str(GRACE_SECONDS + 20), container, timeout=GRACE_SECONDS + 60)
        took = time.monotonic() - started
        exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", container))
        expect(
            exit_code == 0 and took < GRACE_SECONDS,
            f"SIGTERM (docker stop): exit status {exit_code} after {took:.1f} s (grace {GRACE_SECONDS} s)",
        )
    finally:
        (logs / "service.log").write_text(docker.logs(container))
        docker("rm", "-f", container, check=False)


def build_image(docker: Dockerd, workdir: Path, logs: Path, upstream_index: str) -> tuple[str, str]:
    """docker build of the exported source through the private index; returns (the throwaway CA's PEM, the
    PIP_TRUSTED_HOST value), which the image must not contain."""
    ca_pem, cert, key = throwaway_ca(workdir)
    extra_cas = [ca_pem, *machine_cas()]
    trusted_host = f"image-test-{os.getpid()}.invalid"
    started = time.monotonic()
    requested: list[str] = []
    with pypi_proxy(cert, key, upstream_index, requested) as index_url:
        build_args = {
            "PIP_INDEX_URL": index_url,
            "PIP_TRUSTED_HOST": trusted_host,
            "EXTRA_CA_CERTS": "\n".join(pem.strip() for pem in extra_cas),
        }
        args = ["build", "--network", "host", "--progress", "plain", "-t", IMAGE]
        args += [item for name, value in build_args.items() for item in ("--build-arg", f"{name}={value}")]
        command = [docker.cli, *args, str(workdir / "src")]
        result = subprocess.run(command, check=False, env=docker.env, capture_output=True, text=True, timeout=1800)
        (logs / "build.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            # The step output only: BuildKit repeats the whole RUN line, build arguments substituted, around it.
            lines = (result.stdout + result.stderr).splitlines()
            steps = [line for line in lines if re.match(r"#\d+ \d", line)]
            tail = "\n".join(steps[-25:] or lines[-8:])
            raise CheckFailed(f"docker build failed (whole log in {logs / 'build.log'}):\n{tail}")
    say(f"ok   docker build of the committed Dockerfile: {time.monotonic() - started:.0f} s")
    expect(
        bool(requested),
        f"the build went through the private index over TLS signed by EXTRA_CA_CERTS ({len(requested)} pages)",
    )
    return ca_pem, trusted_host


# --- main ---------------------------------------------------------------------------------------------------------


def copy_working_tree(destination: Path) -> None:
    """The files git tracks or would track, as they are now (``--working-tree``: try changes before committing)."""
    listed = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    say("building the working tree as it is (--working-tree), not a clean checkout")


def export_head(destination: Path) -> str:
    head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True, check=True
    )
    destination.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    if run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]).strip():
        say(f"building HEAD {head}: uncommitted changes are NOT in the image")
    else:
        say(f"building HEAD {head} (a clean export)")
    return head


def tool(name: str, preferred: str) -> str:
    found = preferred if os.access(preferred, os.X_OK) else shutil.which(name)
    if not found:
        raise CheckFailed(f"{name} not found: apt-get install docker.io")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pull", action="store_true", help="pull the base image instead of making it locally")
    parser.add_argument("--working-tree", action="store_true", help="build the working tree instead of HEAD")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdc-service" / "image-test"
    parser.add_argument("--cache", type=Path, default=default_cache, help=f"base image cache (default {default_cache})")
    parser.add_argument("--upstream-index", default="https://pypi.org/simple/", help="what the private index relays")
    options = parser.parse_args()
    if os.geteuid() != 0:
        say("needs root (a private dockerd)")
        return 2
    # The distribution's CLI talks to the distribution's daemon and has BuildKit built in (a newer CLI elsewhere on
    # PATH may need the buildx plugin).
    cli, dockerd_bin = tool("docker", "/usr/bin/docker"), tool("dockerd", "/usr/sbin/dockerd")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cdc-image-test-"))
    logs = workdir / "logs"
    logs.mkdir()
    docker = Dockerd(workdir / "docker", dockerd_bin, cli)
    docker.root.mkdir()
    servers: list[NatsServer | RedisServer] = []
    failed = True
    try:
        if options.working_tree:
            copy_working_tree(workdir / "src")
        else:
            export_head(workdir / "src")
        docker.start()
        provide_base(docker, dockerfile_base(), options.cache, workdir, options.pull)

        ca_pem, trusted_host = build_image(docker, workdir, logs, options.upstream_index)
        check_contents(docker, ca_pem, trusted_host)
        nats = NatsServer(logs)
        redis = RedisServer(logs)
        for server in (nats, redis):
            servers.append(server)
            server.start()
        check_commands(docker, workdir / "src", nats.url, redis.url)
        check_service(docker, nats.url, redis.url, logs)
        failed = False
    except (CheckFailed, TimeoutError, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
    except Exception:
        traceback.print_exc()
    finally:
        for server in servers:
            server.stop()
        docker.stop()
        # dockerd leaves its network namespace mounted under the exec root; remove_tree unmounts first.
        for part in (docker.root / "data", docker.root / "exec", workdir / "rootfs", workdir / "src"):
            remove_tree(part)
        if failed:
            say(f"logs kept in {workdir}")
        else:
            remove_tree(workdir)
    say(f"{'FAILED' if failed else 'passed'} in {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
