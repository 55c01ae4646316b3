"""A throwaway copy of the pipeline in its own git repo, so end-to-end tests never touch this repo's dvc.lock."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "layerprune", ".dvc/config", ".dvcignore", ".gitignore"]

# Small sizes: the real embedded model and text, a fraction of the work.
SMALL = {
    # max_chars: lm-eval scores every token of the held-out texts, whatever eval.max_length; short texts keep the
    # perplexity stages and the frontier's evaluations to a few hundred tokens each
    "sample": {"calibration": 12, "eval": 4, "max_chars": 400},
    "similarity": {"max_length": 32, "batch_size": 4},
    "prune": {"search_texts": 2},
    "frontier": {"layers": [1]},
    # 8 validation texts of at least 128 tokens: one batch of 2 blocks of 64
    "heal_corpus": {"validation_texts": 8, "validation_tokens": 128},
    "heal": {"tokens": 512, "seq_len": 64, "batch_size": 2, "eval_every": 2},
    "heal_launch": {"save_every": 2},
    "eval": {"max_length": 64, "batch_size": 2},
}


class PipelineRepo:
    def __init__(self, root: Path):
        self.root = root
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}

    @classmethod
    def create(cls, root: Path, overrides=SMALL) -> "PipelineRepo":
        root.mkdir(parents=True, exist_ok=True)
        for name in PIPELINE_FILES:
            src, dst = REPO / name, root / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dst)
        repo = cls(root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        for section, values in overrides.items():
            params[section].update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        repo.git("init", "-q")
        repo.git("add", "-A")
        repo.git("commit", "-qm", "pipeline")
        return repo

    def git(self, *args):
        return self.run("git", "-c", "user.name=t", "-c", "user.email=t@t", *args)

    def dvc(self, *args, check=True):
        return self.run("dvc", *args, check=check)

    def run(self, *args, check=True):
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, path):
        return json.loads((self.root / path).read_text())

    def commit(self, message="results"):
        self.git("add", "-A")
        self.git("commit", "-qm", message)

    def reset(self):
        """Back to the last commit: params, lock, metrics and the DVC-tracked outputs."""
        self.git("reset", "-q", "--hard")
        self.dvc("checkout", "--force")

    def cache_objects(self) -> dict[str, str]:
        """Every file of the DVC cache by the md5 it is stored under (a folder's listing is `<md5>.dir`, the md5 of
        that JSON), with the md5 of what it holds now. The two differ where a stage wrote in place into an output
        that DVC linked to the cache (.dvc/config: hardlink): the file written is the cache's own copy."""
        objects = {}
        for path in (self.root / ".dvc/cache/files/md5").rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "md5").hexdigest()
                objects[path.parent.name + path.name.removesuffix(".dir")] = content
        return objects

    @staticmethod
    def stages_run(result) -> set[str]:
        """The stages a dvc repro / exp run executed (restored from the run cache counts as not executed)."""
        return set(re.findall(r"Running stage '([\w-]+)'", result.stdout + result.stderr))
