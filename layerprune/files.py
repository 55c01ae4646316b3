"""Reading and writing the files stages hand each other (JSON, JSONL, CSV, folders), atomically: a stage killed
midway never leaves a half-written file or folder for DVC to record. Numbers written to git-tracked files are
rounded (`significant`) to what repeats across runs and machines."""
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from layerprune.errors import UserError


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are normal files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_jsonl(path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def significant(value, digits: int = 4):
    """value rounded to `digits` significant digits, recursively through dicts and lists.

    Evaluation numbers move in the fifth digit between runs on the same kind of machine (summation order of fp32
    kernels), so git-tracked files carry four: a rerun of a committed state then rewrites them unchanged."""
    if isinstance(value, dict):
        return {key: significant(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [significant(item, digits) for item in value]
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, digits - 1 - math.floor(math.log10(abs(value))))
    return value


def link_or_copy(source, target) -> None:
    """A hardlink where the file system allows it (same disk), else a copy: weights are never copied needlessly."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def atomic_dir(path):
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal folder
    old = path.with_name(f"{_temp_prefix(path)}old.tmp")
    try:
        yield tmp
        # Move the previous folder aside in one rename, so a kill never leaves it half deleted.
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def folder_fingerprint(folder: Path) -> str:
    """The names, sizes and modification times of a folder's files, hashed: a change means its files changed (DVC's
    own state cache decides the same way), without reading them."""
    entries = sorted(
        (str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in Path(folder).rglob("*") if path.is_file() and not path.name.startswith(".")
    )
    return "files:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def check_free_space(folder, needed: int, what: str = "the model") -> None:
    """UserError unless `folder`'s disk has room for `needed` bytes and 10% more (tokenizer, metadata)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:
        raise UserError(f"{what} needs ~{needed / 1e9:.1f} GB in {folder}, but only {free / 1e9:.1f} GB is free")


def _temp_prefix(path: Path) -> str:
    # The writer's pid in the name tells a later run whether the temp file is still being written.
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path) -> None:
    """Delete the temp files and folders that a killed run (SIGKILL skips every cleanup) left beside `path`."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_csv(path, rows: list[dict]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
