"""TLS with verification, file modes, and no secret anywhere it could leak."""
import os
import stat
import subprocess

from lab.broker import Broker
from lab.daemon import write_config
from lab.waits import wait_rows


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=mqttd-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "bnp")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def test_tls_with_a_client_certificate_and_verification_on(host, sqlite_db, tmp_path):
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path / "tlsbroker", extra=f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\n"
                                             f"keyfile {pki}/server.key\nrequire_certificate true").start()
    try:
        tls = f'tls = {{ ca_certs = "{pki}/ca.crt", certfile = "{pki}/client.crt", keyfile = "{pki}/client.key" }}'
        d = host.start("bnp", write_config(tmp_path / "c.toml", b.port, broker_extra=tls), sqlite_db)
        d.wait_connected()
        r = subprocess.run(["mosquitto_pub", "-p", str(b.port), "-h", "127.0.0.1", "--cafile", f"{pki}/ca.crt",
                            "--cert", f"{pki}/client.crt", "--key", f"{pki}/client.key", "-q", "1",
                            "-t", "ble/tls/telemetry", "-m", '{"seq": 1}'], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_rows(sqlite_db, 1)
        assert d.stop() == 0

        # A CA that did not sign the broker's certificate: refused, retried, and health says why.
        other = make_pki(tmp_path / "other")
        bad = f'tls = {{ ca_certs = "{other}/ca.crt", certfile = "{pki}/client.crt", keyfile = "{pki}/client.key" }}'
        d = host.start("bnp", write_config(tmp_path / "bad.toml", b.port, broker_extra=bad), sqlite_db)
        st = d.wait_for(lambda s: "CERTIFICATE_VERIFY_FAILED" in (s.get("last_error") or ""), what="verify error")
        assert st["connected"] is False and d.proc.poll() is None
        assert d.stop() == 0
    finally:
        b.stop()


def test_run_and_log_dirs_are_0750_and_files_0640(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(host.run_dir) == 0o750 and mode(host.log_dir / "bnp") == 0o750
    for f in (host.run_dir / "bnp.pid", host.run_dir / "bnp.status.json", host.run_dir / "bnp.subscriptions.json",
              host.log_dir / "bnp" / "mqttd.log"):
        assert mode(f) == 0o640, f
    assert d.stop() == 0


def test_the_password_never_reaches_argv_logs_or_the_status_file(host, broker, sqlite_db, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-Value-42\n")
    secret.chmod(0o600)
    cfg = write_config(tmp_path / "c.toml", broker.port,
                       broker_extra=f'username = "tenant"\npassword_file = "{secret}"')
    d = host.start("bnp", cfg, sqlite_db, env={"MQTTD_BROKER_PASSWORD": "env-pw-should-not-be-used"})
    d.wait_connected()
    cmdline = open(f"/proc/{d.pid}/cmdline", "rb").read().decode()
    assert "s3cr3t" not in cmdline
    assert d.stop() == 0
    everything = d.log() + d.status_path.read_text() + d.proc.stderr.read()
    assert "s3cr3t-Value-42" not in everything and "env-pw" not in everything
    if os.geteuid() == 0:
        assert "running as root" in d.log()
