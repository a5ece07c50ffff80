"""Scoped links and API keys (backend.serve.credentials): the store on disk, the
rules a request meets, and the attacks on both (a stolen store file, a
tampered one, racing processes, a scoped key probing for other models)."""

from __future__ import annotations

import hmac
import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.serve import credentials as C
from backend.serve.credentials import AuthError, Authorizer, CredentialStore, Scope

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return CredentialStore(tmp_path, clock=clock)


def refused(fn, *args, **kwargs) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args, **kwargs)
    return info.value


def test_create_verify_and_the_file_on_disk(store, tmp_path):
    cred, token = store.create(model="run/hf/iter_10", label="for Ana", request_limit=5)
    assert cred.id.startswith("lk_") and len(cred.id) == 11 and int(cred.id[3:], 16) >= 0
    assert token.startswith("fts_") and len(token) >= 4 + 43  # 32 random bytes, URL-safe base64
    assert (cred.kind, cred.model, cred.label, cred.uses, cred.revoked) == ("link", "run/hf/iter_10", "for Ana", 0,
                                                                             False)
    assert store.verify(token) == cred
    assert store.list() == [cred]
    path = tmp_path / ".serve" / "credentials.json"
    text = path.read_text()
    assert token not in text and token[4:] not in text and token[4:20] not in text  # never in plain text
    assert json.loads(text)["credentials"][0]["sha256"] == C.token_hash(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((path.parent / "credentials.lock").stat().st_mode) == 0o600
    assert "sha256" not in vars(cred)  # the record handed around carries no secret either
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_tokens_and_ids_are_fresh(store):
    made = [store.create(model="demo") for _ in range(20)]
    assert len({t for _, t in made}) == 20 and len({c.id for c, _ in made}) == 20
    assert all(store.verify(t).id == c.id for c, t in made)


def test_states_and_their_messages(store, clock):
    expiring, t_exp = store.create(model="demo", expires_in=3600)
    limited, t_lim = store.create(model="demo", request_limit=2)
    revoked, t_rev = store.create(model="demo")
    assert expiring.expires == clock.now + 3600 and expiring.state(clock.now) == "active"
    assert store.revoke(revoked.id).revoked and store.revoke(revoked.id).revoked  # twice is fine

    e = refused(store.verify, t_rev)
    assert (e.status, e.code, str(e)) == (401, "revoked_api_key", "this link was revoked")
    assert e.type == "authentication_error"

    store.record_use(limited.id)
    assert store.record_use(limited.id).uses == 2
    e = refused(store.record_use, limited.id)
    assert (e.status, str(e)) == (429, "this link has used all its 2 requests") and e.type == "rate_limit_error"
    assert refused(store.verify, t_lim).status == 429
    assert {c.id: c.uses for c in store.list()}[limited.id] == 2  # a refused use is not counted

    clock.now += 3600
    e = refused(store.verify, t_exp)
    assert e.status == 401 and str(e) == f"this link expired at {C.format_time(expiring.expires)}"
    assert str(e).endswith("UTC") and "2023-11-14" in str(e)
    assert refused(store.record_use, expiring.id).status == 401
    states = {c.id: c.state(clock.now) for c in store.list()}
    assert states == {expiring.id: "expired", limited.id: "used up", revoked.id: "revoked"}

    e = refused(store.verify, "fts_" + "A" * 43)
    assert (e.status, e.code, str(e)) == (401, "invalid_api_key", "invalid API key")
    with pytest.raises(ValueError, match="no link with id 'lk_nope'"):
        store.revoke("lk_nope")


def test_create_refuses_bad_values(store):
    for kwargs, field in [(dict(model=""), "model"), (dict(model="demo", expires_in=0), "expiry"),
                          (dict(model="demo", request_limit=0), "request limit"),
                          (dict(model="demo", request_limit=2.5), "request limit"),
                          (dict(model="demo", request_limit=True), "request limit")]:
        with pytest.raises(ValueError, match=field):
            store.create(**kwargs)
    assert store.list() == []


@pytest.mark.parametrize("content, why", [
    ("{not json", "damaged"),
    ('{"version": 1, "credentials": {}}', "credentials"),
    ('{"version": 7, "credentials": []}', "version"),
    ('{"version": 1, "credentials": [{"id": "lk_1"}]}', "field"),
    (b"\xff\xfe\x00".decode("latin-1"), "damaged"),
])
def test_a_damaged_store_is_one_clear_error(tmp_path, content, why):
    path = tmp_path / ".serve" / "credentials.json"
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    store = CredentialStore(tmp_path)
    for op in (store.list, lambda: store.verify("fts_x"), lambda: store.create(model="demo")):
        with pytest.raises(C.StoreError, match=why) as info:
            op()
        assert str(path) in str(info.value) and "fix or remove it" in str(info.value)
    assert path.read_text(encoding="utf-8") == content  # never overwritten


def test_tampered_records_and_a_planted_link(store, tmp_path):
    cred, token = store.create(model="demo")
    path = store.path
    data = json.loads(path.read_text())
    for bad in [{"sha256": token}, {"sha256": "ab" * 31}, {"uses": "0"}, {"revoked": 0}, {"created": True}]:
        path.write_text(json.dumps({**data, "credentials": [{**data["credentials"][0], **bad}]}))
        with pytest.raises(C.StoreError, match="entry 0"):
            store.verify(token)
    path.unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(data))
    path.symlink_to(target)
    with pytest.raises(C.StoreError, match="symbolic link"):
        store.verify(token)


def test_a_broken_store_does_not_tell_callers_where_it_is(tmp_path):
    store = CredentialStore(tmp_path)
    store.path.parent.mkdir()
    store.path.write_text("garbage")
    auth = Authorizer(store, api_keys=["sk-operator-key"])
    e = refused(auth.authorize, "fts_someone")
    assert e.status == 500 and str(tmp_path) not in str(e)
    assert auth.authorize("sk-operator-key") == Scope(None, "api-key")  # full keys do not need the store


_RACER = textwrap.dedent("""
    import sys
    from backend.serve.credentials import AuthError, CredentialStore
    store, won = CredentialStore(sys.argv[1]), 0
    while True:
        try:
            store.record_use(sys.argv[2])
            won += 1
        except AuthError as e:
            assert e.status == 429, e
            break
    print(won)
""")


def test_concurrent_uses_from_two_processes_never_pass_the_limit(store, tmp_path):
    limit = 60
    cred, _ = store.create(model="demo", request_limit=limit)
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), cred.id], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    won = [int(p.communicate(timeout=120)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert sum(won) == limit and store.list()[0].uses == limit


def test_hashes_are_compared_in_constant_time(store, monkeypatch):
    cred, token = store.create(model="demo")
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(C.hmac, "compare_digest", spy)
    auth = Authorizer(store, api_keys=["sk-one-key", "sk-two-key"])
    assert auth.authorize("sk-two-key") == Scope(None, "api-key")
    assert len(calls) == 2  # every key compared, none skipped after a match
    calls.clear()
    assert auth.authorize(token) == Scope("demo", cred.id)
    assert len(calls) == 2 + 1 and (C.token_hash(token), C.token_hash(token)) in calls


def test_authorize(store, clock):
    cred, token = store.create(model="run/merged/m", request_limit=3)
    closed = Authorizer(store, api_keys=["sk-operator-key"])
    e = refused(closed.authorize, None)
    assert (e.status, str(e)) == (401, "missing API key: send Authorization: Bearer <key>")
    assert refused(closed.authorize, "  ").status == 401
    assert refused(closed.authorize, "sk-operator-kex").code == "invalid_api_key"
    assert closed.authorize("sk-operator-key", model="anything", use=True) == Scope(None, "api-key")

    assert closed.authorize(token) == Scope("run/merged/m", cred.id)  # /models: not counted
    assert closed.authorize(token, model="run/merged/m", use=True) == Scope("run/merged/m", cred.id)
    assert store.list()[0].uses == 1

    # a scoped key asking for another model hears exactly what an unknown model gets, and is not counted
    e = refused(closed.authorize, token, model="demo", use=True)
    assert (e.status, e.code, str(e)) == (404, "model_not_found", "model demo not found")
    assert str(e) == str(C.model_not_found("demo")) and store.list()[0].uses == 1

    open_ = Authorizer(store, open_access=True)
    assert open_.authorize(None) == open_.authorize("EMPTY") == Scope(None, None)
    assert open_.authorize(token) == Scope("run/merged/m", cred.id)  # a link keeps its scope
    store.revoke(cred.id)
    assert refused(open_.authorize, token).message == "this link was revoked"
    assert Authorizer(None, open_access=True).authorize("x") == Scope(None, None)
    assert refused(Authorizer(None, ["k-1"]).authorize, "x").status == 401


def test_parse_duration():
    assert C.parse_duration("30m") == 1800 and C.parse_duration("1h") == 3600
    assert C.parse_duration("7d") == 7 * 86400 and C.parse_duration("90s") == 90
    assert C.parse_duration(" 2W ") == 14 * 86400 and C.parse_duration("1.5h") == 5400
    assert C.parse_duration("never") is None and C.parse_duration("") is None
    for bad in ("0h", "-1h", "1y", "h", "soon", "1 hour"):
        with pytest.raises(ValueError, match="30m, 1h, 7d"):
            C.parse_duration(bad)


def test_read_api_key(tmp_path):
    assert C.read_api_key(None, None) == []
    assert C.read_api_key(" sk-abc ", None) == ["sk-abc"]
    keys = tmp_path / "keys"
    keys.write_text("# ours\nsk-one\n\n  sk-two  \n")
    assert C.read_api_key(None, str(keys)) == ["sk-one", "sk-two"]
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    for value, file, match in [("a", str(keys), "not both"), ("", None, "--api-key"), ("a b", None, "spaces"),
                               (None, str(tmp_path / "nope"), "no such file"), (None, str(empty), "no key"),
                               (None, str(tmp_path), "cannot read")]:
        with pytest.raises(ValueError, match=match):
            C.read_api_key(value, file)


def test_the_guard_keeps_users_out_of_the_store(tmp_path):
    """A studio user names files for datasets, models and exports: none of them may be the credential store
    (reading it leaks nothing usable, but writing one before the studio does would plant a link)."""
    from backend.core.guard import Guard, GuardError

    CredentialStore(tmp_path).create(model="demo")
    guard = Guard(tmp_path, [], False)
    for value in (str(tmp_path / ".serve" / "credentials.json"), ".serve/credentials.json", ".serve"):
        with pytest.raises(GuardError, match="credentials"):
            guard.readable(value, "dataset")
    for value in (tmp_path / ".serve", tmp_path / ".serve" / "merged"):
        with pytest.raises(GuardError, match="not a place"):
            guard.output_dir(value, "save path")
