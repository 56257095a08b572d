"""Client identities: enrollment, the clients file, signatures, revocation, and the worker's arguments."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.worker.__main__ import bound_clients
from shared import identity
from shared.settings import Settings

FIELDS = {"job_id": "job-1", "round": 1, "client": 0, "digest": "ab" * 32, "num_samples": 10, "train_loss": 0.5}


def test_enroll_writes_a_private_key_only_its_owner_reads_and_registers_the_public_key(tmp_path: Path) -> None:
    clients_file = tmp_path / "clients.yaml"
    public = identity.enroll("site-a", tmp_path / "keys" / "site-a.key", clients_file)
    key_file = tmp_path / "keys" / "site-a.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = identity.load_private_key(key_file)
    assert identity.public_key_text(key) == public
    assert identity.read_clients_file(clients_file) == {"clients": {"site-a": {"public_key": public}}, "revoked": []}


def test_a_signature_verifies_only_for_its_client_and_its_exact_fields(tmp_path: Path) -> None:
    clients_file = tmp_path / "clients.yaml"
    for client in ("site-a", "site-b"):
        identity.enroll(client, tmp_path / f"{client}.key", clients_file)
    registry = identity.ClientRegistry(clients_file)
    signer_a = identity.UpdateSigner.from_file("site-a", tmp_path / "site-a.key")
    signature = signer_a.sign(FIELDS)
    registry.verify("site-a", dict(reversed(FIELDS.items())), signature)  # key order does not matter
    with pytest.raises(identity.IdentityError, match="does not verify as client 'site-b'"):
        registry.verify("site-b", FIELDS, signature)  # A's signature, B's name
    as_b = identity.UpdateSigner("site-b", signer_a.key).sign(FIELDS)  # A's key signing in B's name
    with pytest.raises(identity.IdentityError, match="does not verify"):
        registry.verify("site-b", FIELDS, as_b)
    with pytest.raises(identity.IdentityError, match="does not verify"):
        registry.verify("site-a", {**FIELDS, "num_samples": 100_000}, signature)
    with pytest.raises(identity.IdentityError, match="does not verify"):
        registry.verify("site-a", FIELDS, "not base64!")
    with pytest.raises(identity.IdentityError, match="'site-c' is not enrolled"):
        registry.verify("site-c", FIELDS, signature)


def test_revoking_a_client_stops_its_signatures_at_once_and_enrolling_again_restores_it(tmp_path: Path) -> None:
    clients_file = tmp_path / "clients.yaml"
    identity.enroll("site-a", tmp_path / "a.key", clients_file)
    registry = identity.ClientRegistry(clients_file)
    signature = identity.UpdateSigner.from_file("site-a", tmp_path / "a.key").sign(FIELDS)
    registry.verify("site-a", FIELDS, signature)
    assert identity.revoke("site-a", clients_file) is True
    with pytest.raises(identity.IdentityError, match="'site-a' is revoked"):
        registry.verify("site-a", FIELDS, signature)  # the same registry re-reads the changed file
    assert identity.revoke("site-z", clients_file) is False
    identity.enroll("site-a", tmp_path / "a2.key", clients_file)  # a new key: the old one stays refused
    with pytest.raises(identity.IdentityError, match="does not verify"):
        registry.verify("site-a", FIELDS, signature)
    registry.verify("site-a", FIELDS, identity.UpdateSigner.from_file("site-a", tmp_path / "a2.key").sign(FIELDS))


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("- a list\n", "must be a mapping"),
        ("clients: {site-a: {}}\n", "needs a public_key"),
        ("clients: {site-a: {public_key: 'AAAA'}}\n", "not base64 of a 32-byte Ed25519 key"),
        ("clients: [site-a]\n", "'clients' must map identities"),
        ("clients: {a: [\n", "cannot read the clients file"),
    ],
)
def test_a_bad_clients_file_is_a_clear_error(tmp_path: Path, content: str, error: str) -> None:
    clients_file = tmp_path / "clients.yaml"
    clients_file.write_text(content)
    with pytest.raises(identity.IdentityError, match=error):
        identity.ClientRegistry(clients_file).verify("site-a", FIELDS, "")


def test_a_key_that_is_not_an_ed25519_pem_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("hello")
    with pytest.raises(identity.IdentityError, match="not an unencrypted PEM private key"):
        identity.load_private_key(bad)
    with pytest.raises(identity.IdentityError, match="cannot read the key"):
        identity.load_private_key(tmp_path / "missing.key")


def test_broker_permissions_name_only_the_clients_own_queue() -> None:
    configure, write, read = identity.broker_permissions("pwff", "site-a")
    assert configure == r"^pwff\.client\.site-a\.tasks(\.dead)?$"
    assert write == r"^amq\.default$"
    assert read == r"^pwff\.client\.site-a\.tasks$"


def test_the_cli_enrolls_and_revokes(tmp_path: Path) -> None:
    runner = CliRunner()
    clients_file = tmp_path / "clients.yaml"
    enrolled = runner.invoke(
        app, ["client", "enroll", "site-a", "--out", str(tmp_path / "keys"), "--clients-file", str(clients_file)]
    )
    assert enrolled.exit_code == 0, enrolled.output
    printed = json.loads(enrolled.stdout.strip().splitlines()[-1])
    assert printed["key"] == str(tmp_path / "keys" / "site-a.key")
    assert identity.read_clients_file(clients_file)["clients"]["site-a"]["public_key"] == printed["public_key"]
    revoked = runner.invoke(app, ["client", "revoke", "site-a", "--clients-file", str(clients_file)])
    assert revoked.exit_code == 0 and identity.read_clients_file(clients_file)["revoked"] == ["site-a"]
    bad = runner.invoke(app, ["client", "enroll", "Site A", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "lowercase" in bad.output


def test_a_worker_needs_one_data_file_and_one_key_per_client(tmp_path: Path) -> None:
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    identity.enroll("site-a", tmp_path / "keys" / "site-a.key")
    bound = bound_clients(["site-a"], [str(data)], [], key_dir=tmp_path / "keys")
    assert bound["site-a"].data == data and bound["site-a"].signer.identity == "site-a"
    with pytest.raises(ValueError, match="one --data per --client"):
        bound_clients(["site-a", "site-b"], [str(data)], [])
    with pytest.raises(ValueError, match="needs its key"):
        bound_clients(["site-a"], [str(data)], [])
    with pytest.raises(ValueError, match="does not exist"):
        bound_clients(["site-a"], [str(tmp_path / "nope.jsonl")], [str(tmp_path / "keys" / "site-a.key")])
    with pytest.raises(ValueError, match="given twice"):
        bound_clients(["site-a", "site-a"], [str(data)] * 2, [str(tmp_path / "keys" / "site-a.key")] * 2)
    with pytest.raises(identity.IdentityError, match="cannot read the key"):
        bound_clients(["site-a"], [str(data)], [str(tmp_path / "missing.key")])


def test_worker_clients_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.worker.__main__ import parse_args

    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    identity.enroll("site-a", tmp_path / "site-a.key")
    monkeypatch.setenv("PWFF_CLIENTS", "site-a")
    monkeypatch.setenv("PWFF_CLIENT_DATA", str(data))
    monkeypatch.setenv("PWFF_CLIENT_KEYS", str(tmp_path / "site-a.key"))
    assert list(parse_args([], Settings())) == ["site-a"]
    with pytest.raises(SystemExit):
        parse_args([], Settings(clients=""))  # data files without their clients: a usage error
    for name in ("PWFF_CLIENTS", "PWFF_CLIENT_DATA", "PWFF_CLIENT_KEYS"):
        monkeypatch.delenv(name)
    assert parse_args([], Settings()) == {}  # a pool worker
    with pytest.raises(SystemExit):
        parse_args(["--client", "site-a"], Settings())  # no data file: a usage error


def test_pwff_run_refuses_a_bound_job_with_what_to_do_instead() -> None:
    ran = CliRunner().invoke(app, ["run", str(Path(__file__).parents[1] / "examples" / "bound.yaml")])
    assert ran.exit_code == 2 and "pwff worker --client" in ran.output
