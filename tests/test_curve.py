"""CurveZMQ on tcp:// sockets: keys, who gets in, and a group on another host over it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zmq

from copilot.config import link_specs, load_pipeline, parse_pipeline
from copilot.curve import CurveKeys, generate_keys, load_keys, secure_client, secure_server
from copilot.errors import UsageError
from copilot.links import LinkSpec, Publisher, Subscriber
from tests.test_links import eos, feature
from tests.test_supervisor import (
    ROOT,
    free_port,
    lines,
    start_remote_work,
    supervise,
    two_groups,
    with_remote_work_group,
)

pytestmark = pytest.mark.usefixtures("leak_check")


@pytest.fixture
def keys(tmp_path: Path) -> CurveKeys:
    _, secret = generate_keys(tmp_path / "keys")
    return load_keys(secret)


def other_keys(tmp_path: Path) -> CurveKeys:
    _, secret = generate_keys(tmp_path / "other")
    return load_keys(secret)


def test_a_keypair_is_written_private_and_never_overwritten(tmp_path: Path) -> None:
    public, secret = generate_keys(tmp_path / "k")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    loaded = load_keys(secret)
    assert len(loaded.public) == 40 and len(loaded.secret) == 40
    assert loaded.secret.decode() not in repr(loaded)  # the secret is kept out of logs
    before = secret.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        generate_keys(tmp_path / "k")
    assert secret.read_bytes() == before
    with pytest.raises(ValueError, match="only the public key"):
        load_keys(public)


@pytest.mark.parametrize(("content", "match"), [(None, "no such key file"), ("not a key\n", "not a CurveZMQ key")])
def test_an_unusable_key_file_is_one_clear_line(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "copilot.key_secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_keys(path)


def test_a_readable_secret_key_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, secret = generate_keys(tmp_path / "k")
    os.chmod(secret, 0o644)
    with caplog.at_level(logging.WARNING, logger="copilot.curve"):
        load_keys(secret)
    assert "chmod 600" in caplog.text


async def _send_and_collect(spec: LinkSpec, readers: dict[str, Subscriber], n: int) -> dict[str, list[float]]:
    """Send ``n`` features and an end of stream; what each reader got in the meantime (a reader
    that was not let in gets nothing and times out)."""
    pub = Publisher(spec)
    got: dict[str, list[float]] = {name: [] for name in readers}
    try:
        assert await pub.wait_subscribers(1, 10.0)

        async def read(name: str, sub: Subscriber) -> None:
            while True:
                env = await sub.recv()
                if env.kind == "control":
                    return
                got[name].append(env.payload.values["i"])  # type: ignore[union-attr]

        tasks = {name: asyncio.create_task(read(name, sub)) for name, sub in readers.items()}
        for i in range(n):
            await pub.send(feature(i))
        await pub.send(eos())
        await asyncio.wait(tasks.values(), timeout=3.0)
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    finally:
        for sub in readers.values():
            sub.close()
        pub.close()
    return got


def _spec(endpoint: str, keys: CurveKeys | None) -> LinkSpec:
    return LinkSpec(name="l", endpoint=endpoint, policy="ordered", curve=keys)


def test_a_curve_link_delivers_to_key_holders_only(keys: CurveKeys, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A peer with another key file, or none, fails the handshake; one that got hold of the
    public key alone gets through the handshake and is refused by the ZAP handler."""
    from copilot.links import contexts

    sync, _ = contexts()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    public_only = sync.socket(zmq.SUB)
    public_only.setsockopt(zmq.LINGER, 0)
    public_only.setsockopt(zmq.SUBSCRIBE, b"")
    mine_public, mine_secret = zmq.curve_keypair()
    public_only.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
    public_only.setsockopt(zmq.CURVE_PUBLICKEY, mine_public)
    public_only.setsockopt(zmq.CURVE_SECRETKEY, mine_secret)
    public_only.connect(endpoint)

    async def main() -> dict[str, list[float]]:
        readers = {
            "holder": Subscriber(_spec(endpoint, keys)),
            "other_keys": Subscriber(_spec(endpoint, other_keys(tmp_path))),
            "plain": Subscriber(_spec(endpoint, None)),
        }
        return await _send_and_collect(_spec(endpoint, keys), readers, 50)

    try:
        with caplog.at_level(logging.WARNING, logger="copilot.curve"):
            got = asyncio.run(main())
        assert public_only.poll(0) == 0
    finally:
        public_only.close()
    assert got["holder"] == [float(i) for i in range(50)]
    assert got["other_keys"] == []
    assert got["plain"] == []
    assert f"refused a connection presenting CurveZMQ key {mine_public.decode()[:8]}" in caplog.text


def test_curve_leaves_ipc_links_plain(keys: CurveKeys, tmp_path: Path) -> None:
    data = two_groups(tmp_path / "sink.jsonl")
    data["curve_keys"] = keys.path
    data["links"]["audio"]["endpoint"] = "tcp://127.0.0.1:5999"
    specs = link_specs(parse_pipeline(data, "t.yaml"), run_dir=str(tmp_path))
    assert specs["audio"].curve == keys
    assert specs["frames"].curve is None and specs["frames"].endpoint.startswith("ipc://")


def test_a_non_loopback_bind_needs_curve_keys(keys: CurveKeys, tmp_path: Path) -> None:
    data = two_groups(tmp_path / "sink.jsonl")
    data["links"]["audio"]["endpoint"] = "tcp://0.0.0.0:5999"
    with pytest.raises(UsageError, match=r"links\.audio\.endpoint: refusing to bind .*gamecopilot keys"):
        parse_pipeline(data, "t.yaml")
    data["curve_keys"] = keys.path
    assert parse_pipeline(data, "t.yaml").links["audio"].endpoint == "tcp://0.0.0.0:5999"
    data["curve_keys"] = str(tmp_path / "missing.key_secret")
    with pytest.raises(UsageError, match=r"t\.yaml: curve_keys: .*missing\.key_secret: no such key file"):
        parse_pipeline(data, "t.yaml")


def test_an_address_of_another_host_is_one_clear_line(keys: CurveKeys) -> None:
    """With keys a link may bind beyond loopback, but only to an address of this host."""
    with pytest.raises(UsageError, match=r"^links\.l: cannot bind tcp://203\.0\.113\.7:5999: Cannot assign "
                                         r"requested address \(it must be an address of the host that binds it: "
                                         r"the link's producer's\)$"):
        Publisher(_spec("tcp://203.0.113.7:5999", keys))


def test_curve_keys_are_relative_to_the_config_file(keys: CurveKeys, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = two_groups(tmp_path / "sink.jsonl")
    data["curve_keys"] = "keys/copilot.key_secret"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(ROOT)  # not where the config is
    assert load_pipeline(path).curve_keys == keys.path


def test_the_keys_command_writes_a_keypair_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "copilot", "keys", str(tmp_path / "k")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"curve_keys: {tmp_path / 'k' / 'copilot.key_secret'}" in first.stdout
    load_keys(tmp_path / "k" / "copilot.key_secret")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    (tmp_path / "afile").touch()
    on_a_file = subprocess.run([*cmd[:-1], str(tmp_path / "afile")], cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
    assert (on_a_file.returncode, on_a_file.stderr.strip()) == (
        2, f"gamecopilot: error: {tmp_path / 'afile'} is not a directory")


@pytest.mark.slow
@pytest.mark.parametrize("remote_keys", ["same", "other"])
def test_a_group_on_another_host_runs_over_curve(remote_keys: str, keys: CurveKeys, atari_clip: Path,
                                                 tmp_path: Path) -> None:
    """The supervisor's control and metrics sockets and the links that cross hosts are tcp://,
    so all of them are CURVE here: the run completes through a group started by hand with the
    same key file, and one given another key file is never let in."""
    data = with_remote_work_group(two_groups(tmp_path / "sink.jsonl"))
    data["supervisor"]["ready_timeout_s"] = 6.0
    data["curve_keys"] = keys.path
    remote_config = {**data, "curve_keys": other_keys(tmp_path).path} if remote_keys == "other" else None
    sup, remote = start_remote_work(data, atari_clip, tmp_path, speed=None, remote_config=remote_config)

    try:
        result = asyncio.run(supervise(sup, None, 90))
        if remote_keys == "same":
            remote.wait(30)
    finally:
        remote.kill()
        _, err_bytes = remote.communicate()
    err = err_bytes.decode(errors="replace")
    if remote_keys == "same":
        assert remote.returncode == 0, err
        assert not result.failed and not result.interrupted and result.started
        assert lines(tmp_path / "sink.jsonl") > 10
    else:
        assert "gamecopilot stage GROUP" in result.failed["work"]
        assert "with the same curve_keys file" in result.failed["work"]
        assert not result.started and lines(tmp_path / "sink.jsonl") == 0
        # and the group said why it never reached the supervisor
        assert (f"no CurveZMQ handshake with the supervisor at {data['supervisor']['control_endpoint']}: "
                "it holds another key") in err, err


@pytest.mark.parametrize("case", ["same", "other", "plain", "public_only", "nobody"])
def test_a_connection_that_does_not_come_up_says_why(case: str, keys: CurveKeys, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from copilot.links import contexts
    from copilot.reach import ConnectionWatch

    sync, actx = contexts()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = None
    if case != "nobody":
        server = sync.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        secure_server(server, keys, endpoint)
        server.bind(endpoint)
    client = sync.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    mine = {"same": keys, "other": other_keys(tmp_path), "plain": None, "nobody": keys}.get(case)
    if case == "public_only":
        pub, sec = zmq.curve_keypair()
        client.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
        client.setsockopt(zmq.CURVE_PUBLICKEY, pub)
        client.setsockopt(zmq.CURVE_SECRETKEY, sec)
    else:
        secure_client(client, mine, endpoint)
    watch = ConnectionWatch(client, endpoint, "the test server", actx, curve=case != "plain", patience_s=1.0)
    client.connect(endpoint)

    async def main() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.run(), 3.0)

    try:
        with caplog.at_level(logging.WARNING, logger="copilot.reach"):
            asyncio.run(main())
    finally:
        watch.close()
        client.close()
        if server is not None:
            server.close()
    expected = {
        "same": None,
        "other": "no CurveZMQ handshake with the test server at {ep}: it holds another key",
        "plain": "the test server at {ep} speaks another security mechanism: it has curve_keys and this host has not",
        "public_only": "the test server at {ep} refused this host's CurveZMQ key",
        "nobody": "nothing answers at {ep} (the test server) after 1 s; still trying",
    }[case]
    if expected is None:
        assert watch.connected and not watch.said
    else:
        assert not watch.connected
        # one line, the cause: a failed handshake is not also "nothing answers" once the patience runs out
        assert len(watch.said) == 1 and watch.said[0].startswith(expected.format(ep=endpoint)), watch.said
