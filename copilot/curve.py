"""CurveZMQ on the TCP sockets of a pipeline spread over several hosts.

Without keys a pipeline binds loopback only (DESIGN.md): anything on the network could
otherwise read the frames and inject events.  With ``curve_keys`` set, every ``tcp://``
socket of the pipeline (links, the supervisor's control and metrics sockets) is encrypted
and authenticated with one keypair per deployment:

* a binding socket is a CURVE server holding the secret key;
* a connecting socket is a CURVE client that presents the same keypair and expects the
  server's public key;
* each process that binds runs one ZAP handler (pyzmq's ``ThreadAuthenticator``) that lets
  in only clients holding that keypair, so a peer needs the secret file, not just the public
  key, to connect.

``gamecopilot keys DIR`` makes the keypair; copy the directory to every host.  ``ipc://``
and ``inproc://`` sockets stay plain: they never leave the host, and the run directory they
live in is the user's own.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

log = logging.getLogger(__name__)

KEY_NAME = "copilot"
ZAP_DOMAIN = "gamecopilot"


@dataclass(frozen=True)
class CurveKeys:
    """The deployment's keypair (raw z85 bytes, as ZeroMQ's socket options take them)."""

    public: bytes
    secret: bytes = field(repr=False)
    path: str = ""


def load_keys(path: str | os.PathLike[str]) -> CurveKeys:
    """Read a secret key file written by ``gamecopilot keys``; ValueError (one line) if unusable."""
    import zmq.auth

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such key file (make one with: gamecopilot keys DIR)")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a CurveZMQ key file ({exc})") from None
    if not secret:
        raise ValueError(f"{p}: holds only the public key; give the {KEY_NAME}.key_secret file")
    if len(public) != 40 or len(secret) != 40:
        raise ValueError(f"{p}: not a CurveZMQ key file (keys must be 40 z85 characters)")
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: the secret key file can be read by other users (chmod 600 it)", p)
    return CurveKeys(public=public, secret=secret, path=str(p))


def generate_keys(directory: str | os.PathLike[str], name: str = KEY_NAME) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (0600) in ``directory``.

    Refuses (FileExistsError) to overwrite a keypair: the hosts already given it would no
    longer be let in.  NotADirectoryError when ``directory`` is a file.
    """
    import zmq.auth

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists (remove it first to make a new keypair)")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    return public, secret


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def secure_server(sock: zmq.Socket[Any], keys: CurveKeys | None, endpoint: str) -> None:
    """Make ``sock`` (about to bind ``endpoint``) a CURVE server, if keys are set and it is TCP."""
    if keys is None or not is_tcp(endpoint):
        return
    domain = _authenticator_for(sock.context, keys)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys | None, endpoint: str) -> None:
    """Make ``sock`` (about to connect ``endpoint``) a CURVE client, if keys are set and it is TCP."""
    if keys is None or not is_tcp(endpoint):
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


class _OneKeyOnly:
    """ZAP credentials check: only the deployment's own public key gets in."""

    def __init__(self, public: bytes) -> None:
        self.public = public
        self.refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        if key not in self.refused:  # once per key: a refused peer retries every few seconds
            self.refused.add(key)
            log.warning("refused a connection presenting CurveZMQ key %s: not this pipeline's key "
                        "(copy the same key file to every host)", key.decode(errors="replace")[:8] + "...")
        return False


_lock = threading.Lock()
# libzmq context address -> (its ZAP handler, the domains configured on it); one per context, as
# the handler binds the context's inproc://zeromq.zap.01
_authenticators: dict[int, tuple[Any, set[str]]] = {}


def _domain(keys: CurveKeys) -> str:
    """One ZAP domain per keypair, so a process serving two (tests do) never mixes them up."""
    return f"{ZAP_DOMAIN}-{keys.public[:8].decode(errors='replace')}"


def _authenticator_for(ctx: zmq.Context[Any], keys: CurveKeys) -> str:
    """Start this context's ZAP handler once (it lives as long as the process, as the context
    does) and let ``keys`` in on their own domain, which is returned."""
    from zmq.auth.thread import ThreadAuthenticator

    domain = _domain(keys)
    with _lock:
        known = _authenticators.get(ctx.underlying)
        if known is None:
            sync_ctx = ctx if type(ctx) is zmq.Context else zmq.Context.shadow(ctx.underlying)
            auth = ThreadAuthenticator(sync_ctx)
            auth.start()
            known = _authenticators[ctx.underlying] = (auth, set())
        auth, domains = known
        if domain not in domains:
            auth.configure_curve_callback(domain=domain, credentials_provider=_OneKeyOnly(keys.public))
            domains.add(domain)
    return domain


def helper_sockets() -> set[int]:
    """ids of the sockets the ZAP handlers own (for leak checks: they live with the process)."""
    out: set[int] = set()
    for auth, _ in _authenticators.values():
        thread = getattr(auth, "thread", None)
        for sock in (auth.pipe, auth.zap_socket, getattr(thread, "pipe", None)):
            if sock is not None:
                out.add(id(sock))
    return out
