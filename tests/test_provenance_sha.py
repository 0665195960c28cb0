"""An installed copy (a wheel carried to a GPU machine) has no git checkout: its provenance says
'unknown' unless the builder declared the commit, and then it is marked as declared."""

import harness
from harness import provenance


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
