"""HF -> GGUF conversion with llama.cpp's own `convert_hf_to_gguf.py`, fetched once from the
sdist of the installed llama-cpp-python (the script ships in neither the `gguf` wheel nor the
llama-cpp-python wheel) and cached; see adapters/llamacpp.py for how the backend uses it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.models.zoo import cache_root

CONVERTER_ENV = "QHARNESS_CONVERT_HF_TO_GGUF"
# sha256 of the llama-cpp-python sdists the converter is taken from, by version (PyPI's files);
# pip checks a pinned one itself (--require-hashes). Add a line when the constraints file moves on.
SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}
SOURCE_FILE = "converter-source.json"  # beside the extracted converter: which sdist, which hash
_VENDOR = "vendor/llama.cpp/"
# what convert_hf_to_gguf.py needs next to it (conversion/ exists in recent llama.cpp only)
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")


# --- the converter ---------------------------------------------------------------------------------

def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise HarnessError("llamacpp: llama-cpp-python is not installed (pip install 'qharness[gguf]')") from None


def _extract_converter(sdist: Path, dest: Path) -> Path:
    """Extract convert_hf_to_gguf.py and what it imports from a llama-cpp-python sdist into
    `dest` (atomically: a half-extracted folder is never left under the final name)."""
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                top, _, rest = member.name.partition("/")
                if not member.isfile() or not rest.startswith(_VENDOR):
                    continue
                rel = rest[len(_VENDOR):]
                if not rel.startswith(_CONVERTER_PARTS) or ".." in Path(rel).parts:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise HarnessError(f"llamacpp: {sdist.name} holds no {_VENDOR}convert_hf_to_gguf.py")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "convert_hf_to_gguf.py"


def ensure_converter() -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py matching the installed llama-cpp-python: from
    QHARNESS_CONVERT_HF_TO_GGUF if set, else from the cache, else fetched once from PyPI (the
    sdist of the installed version, ~75 MB) and extracted (convert script + conversion/ +
    gguf-py/ + models/templates/, ~2.3 MB)."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise HarnessError(f"llamacpp: {CONVERTER_ENV}={override} is not a file")
        return path

    version = llama_cpp_version()
    dest = cache_root() / f"llama.cpp-{version}"
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dest.parent.mkdir(parents=True, exist_ok=True)
    pinned = SDIST_SHA256.get(version)
    with tempfile.TemporaryDirectory(prefix="qharness-sdist-") as tmp:
        requirement = f"llama-cpp-python=={version}" + (f" --hash=sha256:{pinned}" if pinned else "")
        (Path(tmp) / "requirements.txt").write_text(requirement + "\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-r", str(Path(tmp) / "requirements.txt"), "-d", tmp, "--quiet"] + (["--require-hashes"] if pinned else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise HarnessError(
                f"llamacpp: could not fetch the llama-cpp-python {version} sources for convert_hf_to_gguf.py "
                f"({why}); set {CONVERTER_ENV}=/path/to/convert_hf_to_gguf.py from a llama.cpp checkout")
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if pinned and digest != pinned:  # pip checked it; this guards the check itself
            raise HarnessError(f"llamacpp: {sdists[0].name} has sha256 {digest}, not the pinned {pinned}")
        script = _extract_converter(sdists[0], dest)
    (dest / SOURCE_FILE).write_text(json.dumps({"sdist": sdists[0].name, "sha256": digest, "pinned": bool(pinned)}))
    return script


def _missing_in_installed_gguf(script: Path) -> list[str]:
    """Names the converter uses (`gguf.X`, `gguf.X.Y`) that the installed gguf lacks. Version
    numbers do not tell: llama.cpp's bundled gguf-py runs ahead of the PyPI release of the same
    number (0.3.36's converter needs gguf.LazyChunkedTensor; PyPI gguf 0.19.0 has none)."""
    import gguf

    files = [script, *sorted((script.parent / "conversion").glob("*.py"))]
    missing: set[str] = set()
    for f in files:
        for first, second in re.findall(r"\bgguf\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", f.read_text(errors="replace")):
            if not hasattr(gguf, first):
                missing.add(first)
            elif second and isinstance(getattr(gguf, first), type) and not hasattr(getattr(gguf, first), second):
                missing.add(f"{first}.{second}")
    return sorted(missing)


def _gguf_choice(script: Path) -> tuple[bool, str]:
    """(use the installed gguf?, description): the installed gguf unless the converter uses
    something it lacks and the converter's own gguf-py is there to use instead."""
    from importlib.metadata import version

    installed = version("gguf")
    missing = _missing_in_installed_gguf(script)
    if not missing or not (script.parent / "gguf-py" / "gguf").is_dir():
        return True, f"installed gguf {installed}"
    return False, f"bundled gguf-py (installed gguf {installed} lacks {', '.join(missing[:3])})"


def _run_converter(script: Path, hf_dir: Path, out: Path, use_installed: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if use_installed:
        env["NO_LOCAL_GGUF"] = "1"  # the script otherwise puts its gguf-py first on sys.path
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parent / "gguf-py"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f16"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def convert_to_f16(hf_dir: Path, out: Path) -> dict[str, Any]:
    """Convert a Hugging Face folder to an F16 GGUF at `out` (atomic); returns provenance."""
    script = ensure_converter()
    use_installed, which = _gguf_choice(script)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    proc = _run_converter(script, hf_dir, tmp, use_installed)
    if proc.returncode != 0 and use_installed and (script.parent / "gguf-py").is_dir():
        # a converter newer than the installed gguf of the same version number: use its own
        which = "bundled gguf-py (the installed gguf failed with this converter)"
        proc = _run_converter(script, hf_dir, tmp, False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise HarnessError(f"llamacpp: convert_hf_to_gguf.py failed on {hf_dir}: {lines[-1] if lines else proc.returncode}")
    os.replace(tmp, out)
    meta = {"converter": str(script), "gguf": which, "convert_s": round(time.perf_counter() - t0, 1)}
    source = script.parent / SOURCE_FILE
    if source.is_file():  # the sdist it came from and whether its hash was pinned
        meta["converter_source"] = json.loads(source.read_text())
    out.with_suffix(".json").write_text(json.dumps(meta))
    return meta
