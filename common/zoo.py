"""Fetch the ONNX model zoo's MobileNetV2 files, checked, into the models folder.

Every file, downloaded or already there, is checked: against its sha256 where one is pinned here
(the int8 model), else (the fp32 model, whose digest is not pinned) it must parse as an ONNX model
with one float [N, 3, 224, 224] input and a float [N, 1000] first output. A file that fails is not
saved (a download) or is fetched again (one already there). Where the zoo cannot be reached,
`--from` (or MOBISERVE_MODEL_MIRROR) names a local folder or a base URL holding the same file
names; the checks are the same."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mobiserve.common.onnx_file import NotAModel, check_classifier

ZOO_BASE = "https://github.com/onnx/models/raw/main/vision/classification/mobilenet/model"
DEFAULT_MODELS_DIR = Path(os.environ.get("MOBISERVE_MODELS", "models"))
MIRROR_ENV = "MOBISERVE_MODEL_MIRROR"


@dataclass(frozen=True)
class ZooModel:
    name: str
    filename: str
    sha256: str | None  # None: not pinned here; the file is checked for its inputs and outputs only
    description: str
    input_size: int = 224
    classes: int = 1000

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


def by_filename(path: Path) -> ZooModel | None:
    """The zoo entry a file is named after, if any."""
    return next((m for m in ZOO.values() if m.filename == path.name), None)


def problem(model: ZooModel, path: Path) -> str | None:
    """Why the file at `path` is not `model`, in a few words (None: it is, as far as can be
    checked): its sha256 where one is pinned, else its inputs and outputs."""
    if model.sha256 is not None:
        digest = sha256_of(path)
        return None if digest == model.sha256 else f"sha256 {digest} does not match the expected {model.sha256}"
    try:
        check_classifier(path, model.input_size, model.classes)
    except NotAModel as exc:
        return str(exc)
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pull(model: ZooModel, dest_dir: Path = DEFAULT_MODELS_DIR, source: str | None = None, timeout: float = 60) -> Path:
    """Download (or copy from `source`) one model, check it, store it atomically; a file already
    there is kept when it passes the checks, else fetched again. Returns its path."""
    source = source or os.environ.get(MIRROR_ENV) or None
    dest = dest_dir / model.filename
    if dest.is_file() and problem(model, dest) is None:
        return dest
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".download-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            _fetch(model, source, tmp, timeout, dest_dir)
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            if created:  # leave no empty models folder behind a failed pull
                dest_dir.rmdir()
            raise
    wrong = problem(model, tmp_path)
    if wrong is not None:
        tmp_path.unlink()
        where = source or model.url
        raise ZooError(f"{model.filename} from {where} is not the zoo's {model.name} model ({wrong}); not saved")
    # NamedTemporaryFile makes the file 0600; a model is data like any other: the umask decides
    tmp_path.chmod(0o666 & ~_umask())
    tmp_path.replace(dest)
    return dest


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fetch(
    model: ZooModel, source: str | None, out: tempfile._TemporaryFileWrapper[bytes], timeout: float, dest_dir: Path
) -> None:
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
            f"No network? Copy {model.filename} into {dest_dir.resolve()} by other means (or serve it from "
            f"anywhere with --model PATH), or point `mobiserve models pull --from DIR` (or ${MIRROR_ENV}=DIR) at a "
            "folder that holds it."
        ) from None
