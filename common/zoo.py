"""Fetch the ONNX model zoo's MobileNetV2 files, checked by sha256, into the models folder.

Where the zoo cannot be reached, `--from` (or MOBISERVE_MODEL_MIRROR) names a local folder or a
base URL holding the same file names; the checksum is verified either way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ZOO_BASE = "https://github.com/onnx/models/raw/main/vision/classification/mobilenet/model"
DEFAULT_MODELS_DIR = Path(os.environ.get("MOBISERVE_MODELS", "models"))
MIRROR_ENV = "MOBISERVE_MODEL_MIRROR"


@dataclass(frozen=True)
class ZooModel:
    name: str
    filename: str
    sha256: str | None  # None: the digest is not pinned here; the download is reported, not checked
    description: str

    @property
    def url(self) -> str:
        return f"{ZOO_BASE}/{self.filename}"


ZOO = {
    m.name: m
    for m in (
        ZooModel(
            "int8",
            "mobilenetv2-12-int8.onnx",
            "cc028fe6cae7bc11a4ff53cfc9b79c920e8be65ce33a904ec3e2a8f66d77f95f",
            "MobileNet v2-1.0 int8 (QOperator), top-1 68.30%",
        ),
        ZooModel("fp32", "mobilenetv2-12.onnx", None, "MobileNet v2-1.0 fp32, top-1 69.48%"),
    )
}
DEFAULT_MODEL = ZOO["int8"]


class ZooError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pull(model: ZooModel, dest_dir: Path = DEFAULT_MODELS_DIR, source: str | None = None, timeout: float = 60) -> Path:
    """Download (or copy from `source`) one model, verify it, store it atomically. Returns its path."""
    source = source or os.environ.get(MIRROR_ENV) or None
    dest = dest_dir / model.filename
    if dest.is_file() and (model.sha256 is None or sha256_of(dest) == model.sha256):
        return dest
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".download-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            _fetch(model, source, tmp, timeout)
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            if created:  # leave no empty models folder behind a failed pull
                dest_dir.rmdir()
            raise
    digest = sha256_of(tmp_path)
    if model.sha256 is not None and digest != model.sha256:
        tmp_path.unlink()
        raise ZooError(f"{model.filename}: sha256 {digest} does not match the expected {model.sha256}; not saved")
    # NamedTemporaryFile makes the file 0600; a model is data like any other: the umask decides
    tmp_path.chmod(0o666 & ~_umask())
    tmp_path.replace(dest)
    return dest


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fetch(model: ZooModel, source: str | None, out: tempfile._TemporaryFileWrapper[bytes], timeout: float) -> None:
    if source and not source.startswith(("http://", "https://")):
        local = Path(source) / model.filename
        if not local.is_file():
            raise ZooError(f"{local} does not exist (looked there because of --from / ${MIRROR_ENV})")
        with local.open("rb") as f:
            shutil.copyfileobj(f, out)
        return
    url = f"{source.rstrip('/')}/{model.filename}" if source else model.url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ZooError(
            f"cannot download {url}: {reason}.\n"
            f"No network? Copy {model.filename} here by other means and run with --model PATH, or point "
            f"`mobiserve models pull --from DIR` (or ${MIRROR_ENV}=DIR) at a folder that holds it."
        ) from None
