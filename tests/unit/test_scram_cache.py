"""auth.DerivedSecrets: SCRAM verifiers derived from plaintext auth_file secrets are derived once, not
per login attempt (issue 7, item 7). The login path itself: test_scram_exchanges.py."""

from __future__ import annotations

import base64
import os

from pgrelay.auth import DerivedSecrets, ScramSecret

from .test_scram_exchanges import counting  # noqa: F401 (fixture)


# -- the cache ------------------------------------------------------------------------------------

def test_derives_once_per_user_password_salt_and_iterations(counting):
    cache = DerivedSecrets()
    salt = os.urandom(16)
    first = cache.get("alice", "pw-1", salt, 4096)
    assert all(cache.get("alice", "pw-1", salt, 4096) is first for _ in range(100))
    assert counting.pbkdf2_calls == 1
    assert first == ScramSecret.from_password("pw-1", 4096, salt)  # the verifier itself is right
    # A changed password is never answered from the cache, and replaces the old entry.
    second = cache.get("alice", "pw-2", salt, 4096)
    assert second.stored_key != first.stored_key and len(cache) == 1
    assert counting.pbkdf2_calls == 3  # (the check above derived once too)
    assert cache.get("alice", "pw-1", salt, 4096) == first
    assert counting.pbkdf2_calls == 4
    # Other iterations, salt or user: entries of their own.
    cache.get("alice", "pw-1", salt, 8192)
    cache.get("alice", "pw-1", os.urandom(16), 4096)
    cache.get("bob", "pw-1", salt, 4096)
    assert len(cache) == 4 and counting.pbkdf2_calls == 7
    cache.clear()
    assert len(cache) == 0
    cache.get("alice", "pw-1", salt, 4096)
    assert counting.pbkdf2_calls == 8


def test_is_bounded_least_recently_used_first(counting):
    cache = DerivedSecrets(maxsize=3)
    salt = b"s" * 16
    for user in ("a", "b", "c"):
        cache.get(user, "pw", salt, 1)
    cache.get("a", "pw", salt, 1)          # a is now the most recently used
    cache.get("d", "pw", salt, 1)          # evicts b
    assert len(cache) == 3 and counting.pbkdf2_calls == 4
    cache.get("a", "pw", salt, 1)
    cache.get("c", "pw", salt, 1)
    assert counting.pbkdf2_calls == 4
    cache.get("b", "pw", salt, 1)
    assert counting.pbkdf2_calls == 5


def test_repr_shows_no_secret():
    cache = DerivedSecrets()
    secret = cache.get("alice", "Very-Secret-Pw", b"s" * 16, 1)
    for text in (repr(cache), str(cache), repr(secret)):
        assert "Very-Secret-Pw" not in text
        assert base64.b64encode(secret.stored_key).decode() not in text


def test_cleartext_checks_against_a_scram_secret_derive_once(counting):
    """A cleartext password checked against a stored SCRAM verifier (serverless clients always send
    one) derives once per password, and a wrong one is still refused."""
    from pgrelay.auth import verify_plain
    verifier = ScramSecret.from_password("right-1", 4096, os.urandom(16))
    text = verifier.encode()
    assert ScramSecret.parse(text) is not None
    cache = DerivedSecrets()
    counting.pbkdf2_calls = 0
    assert all(verify_plain("right-1", text, "alice", cache) for _ in range(50))
    assert counting.pbkdf2_calls == 1
    assert not verify_plain("wrong", text, "alice", cache)
    assert verify_plain("right-1", text, "alice", cache)
    assert counting.pbkdf2_calls == 3
    assert verify_plain("right-1", text, "alice") and not verify_plain("wrong", text, "alice")
