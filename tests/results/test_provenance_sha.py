"""An installed copy (a wheel carried to a GPU machine) has no git checkout: its provenance says
'unknown' unless the builder declared the commit, and then it is marked as declared."""

import pytest

import harness
from harness.results import provenance


def test_git_sha_of_an_installed_copy(monkeypatch, tmp_path):
    fake = tmp_path / "site" / "harness"
    fake.mkdir(parents=True)
    monkeypatch.setattr(harness, "__file__", str(fake / "__init__.py"))
    monkeypatch.delenv("QHARNESS_GIT_SHA", raising=False)
    provenance.git_sha.cache_clear()
    try:
        assert provenance.git_sha() == "unknown"
        monkeypatch.setenv("QHARNESS_GIT_SHA", "92299a6")
        provenance.git_sha.cache_clear()
        assert provenance.git_sha() == "92299a6 (declared)"
    finally:
        provenance.git_sha.cache_clear()


def test_a_declared_commit_that_disagrees_with_the_checkout_is_kept_beside_it(monkeypatch):
    provenance.git_sha.cache_clear()
    try:
        monkeypatch.delenv("QHARNESS_GIT_SHA", raising=False)
        found = provenance.git_sha()
        if found == "unknown":
            pytest.skip("no git checkout here: nothing for a declaration to disagree with")
        monkeypatch.setenv("QHARNESS_GIT_SHA", found[:7])
        provenance.git_sha.cache_clear()
        assert provenance.git_sha() == found  # agrees: the checkout's reading alone
        monkeypatch.setenv("QHARNESS_GIT_SHA", "0000000")
        provenance.git_sha.cache_clear()
        assert provenance.git_sha() == f"{found} (checkout); 0000000 (declared)"
    finally:
        provenance.git_sha.cache_clear()
