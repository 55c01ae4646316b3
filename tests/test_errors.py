"""Issue 7, through the real CLI: a bad input ends in one line that names what to fix, text of any shape and script
goes through every stage, and a killed stage leaves nothing half-written for DVC to record."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from layerprune.errors import UserError
from layerprune.files import read_jsonl, remove_stale_temps
from layerprune.texts import fetch_bundled
from pipeline_repo import PipelineRepo
from local_wikipedia import write_local_wikipedia


def write_params(path, changes=(), raw=()):
    """The repository's params.yaml with `changes` ({"section.key": value}) applied; `raw` values are written into
    the YAML text as they are (unquoted), to see what YAML makes of them."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    placeholders = {key: f"RAW_VALUE_{i}_" for i, key in enumerate(dict(raw))}
    for key, value in {**dict(changes), **placeholders}.items():
        *sections, name = key.split(".")
        target = params
        for section in sections:
            target = target[section]
        if value is DELETE:
            del target[name]
        else:
            target[name] = value
    text = yaml.safe_dump(params, sort_keys=False, allow_unicode=True)
    for key, value in dict(raw).items():
        text = text.replace(placeholders[key], value)
    path.write_text(text)
    return path


DELETE = object()


def stage(script, params, *args, env=None, cwd):
    """Run stages/<script> as dvc.yaml would, from `cwd`."""
    return subprocess.run([sys.executable, REPO / "stages" / script, "--params", params, *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def fetch_wiki(tmp_path, params):
    return stage("fetch_wiki.py", params, "--corpus", tmp_path / "corpus.jsonl", "--metrics", tmp_path / "corpus.json",
                 cwd=tmp_path)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ---- params: every stage validates all of them before any work ----

BAD_PARAMS = [
    # (changes, raw YAML, what the one line must say)
    ({"lang": "xx"}, {}, ["lang='xx' is not in the bundled corpora", "available: am, ar,", " ja, ", " zh"]),
    ({}, {"lang": "off"}, ["lang='off' is not in the bundled corpora"]),  # YAML 1.1 would say False: Norwegian
    ({}, {"lang": "yes"}, ["lang='yes' is not in the bundled corpora"]),
    ({}, {"lang": "1"}, ["lang=1: must be a language code like es or de"]),
    ({}, {"lang": "true"}, ["lang=True: YAML reads it as a boolean; quote"]),
    ({"data.source": "web"}, {}, ["data.source='web'", "'bundled' or 'hub'"]),
    ({"model.id": "bundled:gpt5"}, {}, ["model.id='bundled:gpt5': unknown bundled model", "bundled:gemma3-270m"]),
    ({"model.id": "my model!"}, {}, ["model.id='my model!': not a bundled model, a local folder or a hub id", "org/name"]),
    ({"model.id": "/data/my-finetune"}, {}, ["model.id='/data/my-finetune': no such folder"]),
    ({"eval.tasks": "xnli_es"}, {}, ["eval.tasks='xnli_es'", "list"]),
    ({"model.device": "tpu"}, {}, ["model.device='tpu'", "'auto', 'cpu' or 'cuda'"]),
    ({"prune.layers": 0}, {}, ["prune.layers=0: must be at least 1"]),
    ({"prune.layers": -3}, {}, ["prune.layers=-3: must be at least 1"]),
    ({"prune.layers": None, "prune.fraction": 1.5}, {}, ["prune.fraction=1.5: Input should be less than 1"]),
    ({"prune.layers": None, "prune.fraction": 0.0}, {}, ["prune.fraction=0.0: Input should be greater than 0"]),
    ({"prune.fraction": 0.25}, {}, ["set exactly one of prune.layers and prune.fraction"]),
    ({"prune.keep_last": -1}, {}, ["prune.keep_last=-1"]),
    ({"sample.calibration": 0}, {}, ["sample.calibration=0: Input should be greater than 0"]),
    ({"sample.eval": -1}, {}, ["sample.eval=-1"]),
    ({"sample.min_chars": 0}, {}, ["sample.min_chars=0"]),
    ({"sample.min_chars": 500, "sample.max_chars": 100}, {}, ["sample.min_chars=500 is above sample.max_chars=100"]),
    ({"similarity.max_length": 0}, {}, ["similarity.max_length=0: Input should be greater than 0"]),
    ({"similarity.batch_size": -1}, {}, ["similarity.batch_size=-1"]),
    ({"eval.max_length": 0}, {}, ["eval.max_length=0: Input should be greater than 0"]),
    ({"eval.batch_size": -4}, {}, ["eval.batch_size=-4"]),
    ({"data.max_articles": 0}, {}, ["data.max_articles=0"]),
    # wrong types
    ({"sample.calibration": "many"}, {}, ["sample.calibration='many': Input should be a valid integer"]),
    ({"prune.layers": 2.5}, {}, ["prune.layers=2.5: Input should be a valid integer"]),
    ({"model": "gemma"}, {}, ["model='gemma': must be a section of keys"]),
    ({"similarity.metric": "cosine"}, {}, ["similarity.metric='cosine'", "'angular_last'"]),
    ({"sample.calibraton": 5}, {}, ["sample.calibraton: unknown key (a typo?)"]),
    ({"eval.max_length": DELETE}, {}, ["eval.max_length is missing"]),
]


@pytest.mark.parametrize("changes, raw, fragments", BAD_PARAMS, ids=[fragments[0][:40] for *_, fragments in BAD_PARAMS])
def test_bad_param_stops_any_stage_with_one_line(tmp_path, changes, raw, fragments):
    # fetch-wiki reads none of eval.*, similarity.* or prune.*, and still refuses to start
    params = write_params(tmp_path / "bad.yaml", changes, raw)
    assert_one_line_error(fetch_wiki(tmp_path, params), f"error: {params}: ", *fragments)
    assert not (tmp_path / "corpus.jsonl").exists() and not (tmp_path / "corpus.json").exists()


@pytest.mark.parametrize("text, fragment", [
    ("", "expected a mapping of sections (lang, model, data, ...), got an empty file"),
    ("- lang: es\n", "expected a mapping of sections (lang, model, data, ...), got a list"),
    ("lang: [es\n", "cannot read"),
])
def test_params_file_of_the_wrong_shape(tmp_path, text, fragment):
    (tmp_path / "bad.yaml").write_text(text)
    assert_one_line_error(fetch_wiki(tmp_path, tmp_path / "bad.yaml"), fragment)
    assert_one_line_error(fetch_wiki(tmp_path, tmp_path / "missing.yaml"), "cannot read", "missing.yaml")


def test_debug_shows_the_traceback(tmp_path):
    params = write_params(tmp_path / "bad.yaml", {"eval.max_length": 0})
    result = stage("fetch_wiki.py", params, "--corpus", "c.jsonl", "--metrics", "m.json", cwd=tmp_path,
                   env={"LAYERPRUNE_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: " in result.stderr and "eval.max_length=0" in result.stderr


@pytest.mark.parametrize("raw, lang", [
    ({"lang": "no"}, "no"),  # Norwegian, which YAML 1.1 reads as False
    ({"lang": "ES"}, "es"),
    ({"data.snapshot": "20231101", "model.revision": "1234"}, "es"),  # unquoted digits: YAML makes them ints
])
def test_values_yaml_turns_into_something_else_still_work(tmp_path, raw, lang):
    params = write_params(tmp_path / "params.yaml", raw=raw)
    result = fetch_wiki(tmp_path, params)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "corpus.json").read_text())["lang"] == lang


def test_unquoted_snapshot_date_reaches_the_hub_loader(tmp_path):
    rows = [{"id": str(i), "url": "", "title": f"T{i}", "text": f"Texto {i}"} for i in range(3)]
    write_local_wikipedia(tmp_path / "wiki", "20231101.es", rows)
    params = write_params(tmp_path / "params.yaml", {"data.source": "hub", "data.dataset": str(tmp_path / "wiki")},
                          raw={"data.snapshot": "20231101"})
    result = fetch_wiki(tmp_path, params)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "corpus.json").read_text())["corpus"].endswith(":20231101.es")


def test_hub_model_while_offline_points_at_the_bundled_default(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"model.id": "tiiuae/falcon-11B"})
    result = stage("model_source.py", params, "--source", tmp_path / "source.json", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "model.id='tiiuae/falcon-11B'", "HF_HUB_OFFLINE=1", "model.id=bundled:gemma3-270m")
    assert not (tmp_path / "source.json").exists()


@pytest.mark.parametrize("remove, fragment", [
    ("config.json", "no config.json in the folder"),
    ("model.safetensors", "no *.safetensors weights in the folder"),
])
def test_local_model_folder_without_what_mergekit_reads(tmp_path, remove, fragment):
    from layerprune.tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "mine")
    (tmp_path / "mine" / remove).unlink()
    params = write_params(tmp_path / "params.yaml", {"model.id": str(tmp_path / "mine")})
    result = stage("model_source.py", params, "--source", tmp_path / "source.json", cwd=tmp_path)
    assert_one_line_error(result, f"model.id={str(tmp_path / 'mine')!r}", fragment)


def test_sample_larger_than_the_corpus_gives_both_numbers(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": "", "text": f"{i} " + "x" * 80}) + "\n"
                              for i in range(20)))
    params = write_params(tmp_path / "params.yaml", {"sample.calibration": 100, "sample.eval": 4})
    result = stage("sample.py", params, "--corpus", corpus, "--calibration", "cal.jsonl", "--eval-texts", "ev.jsonl",
                   "--metrics", "sample.json", cwd=tmp_path)
    assert_one_line_error(result, "sample.calibration + sample.eval = 100 + 4 = 104", "only 20 usable texts")
    assert not (tmp_path / "cal.jsonl").exists()


def write_model_info(path, num_layers, model_id="bundled:gemma3-270m", architecture="Gemma3ForCausalLM", local_dir=None):
    from layerprune.bundled import BUNDLED_MODELS
    from layerprune.models import ModelInfo

    bundled = BUNDLED_MODELS[model_id]
    ModelInfo(id=model_id, kind="bundled", revision="test", architecture=architecture, num_layers=num_layers,
              num_parameters=1, local_dir=str(local_dir or path.parent), base_model=bundled.upstream,
              license={"license": bundled.license}).save(path)
    return path


def write_distances(path, num_layers):
    rows = [f"{metric},{n},{start},0.5" for metric in ("angular_last", "angular_mean", "block_influence")
            for n in range(1, num_layers) for start in range(num_layers - n + 1)]
    path.write_text("metric,n,start,distance\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("changes, fragment", [
    ({"prune.layers": 18}, "prune.layers=18: drops 18 of the model's 18 layers; it must keep at least 1"),
    ({"prune.layers": None, "prune.fraction": 0.01}, "prune.fraction=0.01: drops 0 of the model's 18 layers"),
    ({"prune.keep_first": 10, "prune.keep_last": 7},
     "prune.keep_first=10, prune.keep_last=7: leave 1 droppable layers of 18, too few for a block of 2"),
])
def test_block_that_does_not_fit_the_model(tmp_path, changes, fragment):
    write_model_info(tmp_path / "base.json", 18)
    write_distances(tmp_path / "distances.csv", 18)
    params = write_params(tmp_path / "params.yaml", {"prune.layers": 2, **changes})
    result = stage("choose_range.py", params, "--model-info", "base.json", "--distances", "distances.csv",
                   "--calibration", "cal.jsonl", "--merge-config", "slice.yaml", "--metrics", "choice.json",
                   "--heatmap", "h.png", "--curve", "c.csv", "--block-losses", "l.csv", cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "slice.yaml").exists()


def test_architecture_mergekit_cannot_slice_stops_the_model_stage(tmp_path):
    """A local folder with an architecture mergekit has no definition for: model-source accepts the folder, and the
    model stage stops with one line before any later stage spends time on it."""
    from layerprune.tiny_models import VOCAB, build
    from transformers import OPTConfig

    build(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                     word_embed_proj_dim=32), seed=0).save_pretrained(tmp_path / "opt")
    params = write_params(tmp_path / "params.yaml", {"model.id": str(tmp_path / "opt")})
    result = stage("model_source.py", params, "--source", "source.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "source.json").read_text())["kind"] == "local"
    result = stage("model.py", params, "--source", "source.json", "--model-dir", "base", "--info", "base.json",
                   "--tokenizer-dir", "tokenizer", cwd=tmp_path)
    assert_one_line_error(result, "has no architecture definition for OPTForCausalLM; cannot slice it")
    assert not (tmp_path / "base.json").exists()


def test_not_enough_disk_for_the_pruned_model(tmp_path):
    from layerprune.files import check_free_space

    with pytest.raises(UserError, match=r"^the pruned model needs ~1000000000\.0 GB in .*, but only [\d.]+ GB is free$"):
        check_free_space(tmp_path / "models", needed=10**18, what="the pruned model")
    check_free_space(tmp_path / "models", needed=1000)


def test_bad_param_through_dvc_repro_is_one_line(tmp_path):
    repo = PipelineRepo.create(tmp_path / "repo", overrides={"eval": {"max_length": 0}})
    result = repo.dvc("repro", "fetch-wiki", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: params.yaml: eval.max_length=0: Input should be greater than 0" in output.splitlines()
    assert "Traceback" not in output
    assert not (repo.root / "data/corpus.jsonl").exists()


# ---- text of every shape and script ----


@pytest.mark.parametrize("lang, letter", [("ru", "и"), ("zh", "的"), ("ja", "の")])
def test_non_latin_scripts_fetch_and_sample(tmp_path, lang, letter):
    params = write_params(tmp_path / "params.yaml", {"lang": lang, "sample.calibration": 20, "sample.eval": 5,
                                                      "sample.min_chars": 10})
    assert fetch_wiki(tmp_path, params).returncode == 0
    result = stage("sample.py", params, "--corpus", "corpus.jsonl", "--calibration", "cal.jsonl",
                   "--eval-texts", "ev.jsonl", "--metrics", "sample.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    texts = [row["text"] for row in read_jsonl(tmp_path / "cal.jsonl") + read_jsonl(tmp_path / "ev.jsonl")]
    assert len(texts) == 25 and any(letter in text for text in texts)


def odd_texts():
    """One text of each shape a corpus can hold, in several scripts."""
    scripts = [fetch_bundled(lang)[1][0]["text"] for lang in ("ru", "zh", "ja")]
    return {
        "ru": scripts[0], "zh": scripts[1], "ja": scripts[2],
        "long": "palabra " * 50_000,  # 400k characters
        "one_token": "a",
        "empty": "",
        "whitespace": " \n\t ",
    }


def test_sample_drops_and_counts_empty_short_and_duplicate_texts(tmp_path):
    texts = odd_texts()
    rows = [{"id": name, "title": "", "text": text} for name, text in texts.items()]
    rows.append({"id": "ru", "title": "again", "text": texts["ru"]})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    params = write_params(tmp_path / "params.yaml", {"sample.calibration": 3, "sample.eval": 1,
                                                      "sample.min_chars": 2, "sample.max_chars": 2000})
    result = stage("sample.py", params, "--corpus", "corpus.jsonl", "--calibration", "cal.jsonl",
                   "--eval-texts", "ev.jsonl", "--metrics", "sample.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "sample.json").read_text())["dropped"] == {
        "empty": 2, "too_short": 1, "duplicate_id": 1}
    kept = {row["id"]: row["text"] for row in read_jsonl(tmp_path / "cal.jsonl") + read_jsonl(tmp_path / "ev.jsonl")}
    assert set(kept) == {"ru", "zh", "ja", "long"}
    assert 1900 < len(kept["long"]) <= 2000 and kept["zh"] == texts["zh"]


@pytest.fixture
def model_info(smollm2_dir, tmp_path):
    return write_model_info(tmp_path / "base.json", 30, "bundled:smollm2-135m", "LlamaForCausalLM", smollm2_dir)


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"id": name, "text": text}, ensure_ascii=False) + "\n"
                            for name, text in texts.items()))


@pytest.mark.slow  # exports SmolLM2 (~20 s, once per session) and loads it in the stage (~15 s)
def test_layer_similarity_drops_texts_of_under_two_tokens(tmp_path, model_info):
    texts = odd_texts()
    texts["long"] = texts["long"][:2000]
    write_texts(tmp_path / "cal.jsonl", {**texts, "full_stop": "。"})
    params = write_params(tmp_path / "params.yaml", {"similarity.max_length": 16, "similarity.batch_size": 4})
    result = stage("layer_similarity.py", params, "--model-info", model_info, "--calibration", "cal.jsonl",
                   "--distances", "distances.csv", "--metrics", "similarity.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "similarity.json").read_text())
    # "a", "。" and "" are one token or none for SmolLM2 (no BOS); the whitespace text is a token of its own
    assert metrics["dropped_texts"] == {"fewer_than_2_tokens": 3}
    assert metrics["samples"] == 5
    assert all(0 <= entry["distance"] <= 1 for entry in metrics["best_start"].values())


@pytest.mark.slow  # lm-eval on SmolLM2: ~40 s
def test_perplexity_scores_every_script_and_drops_blank_texts(tmp_path, model_info):
    texts = odd_texts()
    texts["long"] = texts["long"][:600]
    write_texts(tmp_path / "ev.jsonl", texts)
    params = write_params(tmp_path / "params.yaml", {"eval.max_length": 64, "eval.batch_size": 4})
    result = stage("perplexity.py", params, "--model-info", model_info, "--eval-texts", "ev.jsonl",
                   "--metrics", "ppl.json", "--results", "lm_eval.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "ppl.json").read_text())
    assert metrics["dropped_texts"] == {"blank": 2} and metrics["num_texts"] == 5
    assert all(math.isfinite(metrics[m]) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"))


# ---- a stage killed midway ----


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        (tmp_path / f".corpus.jsonl.{pid}.x1y2.tmp").write_text("partial")
        (tmp_path / f".base.{pid}.x1y2.tmp").mkdir()
    (tmp_path / ".other.jsonl.1.x1y2.tmp").write_text("not ours")
    remove_stale_temps(tmp_path / "corpus.jsonl")
    remove_stale_temps(tmp_path / "base")
    assert temp_files(tmp_path) == sorted([f".corpus.jsonl.{os.getpid()}.x1y2.tmp", f".base.{os.getpid()}.x1y2.tmp",
                                           ".other.jsonl.1.x1y2.tmp"])


def temp_files(folder):
    return sorted(p.name for p in folder.glob(".*.tmp"))


def wait_until_gone(group: int, timeout: float = 60) -> None:
    """Until no process of the process group is left (its cleanup done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_repro_leaves_no_half_written_output_and_reruns(tmp_path, sig):
    # A corpus big enough (~60 MB) that writing it takes a moment: we kill as soon as its temp file appears.
    rows = [{"id": str(i), "url": "", "title": f"T{i}", "text": f"{i} " + "palabra " * 750} for i in range(10_000)]
    write_local_wikipedia(tmp_path / "wiki", "20231101.es", rows)
    repo = PipelineRepo.create(tmp_path / "repo", overrides={
        "data": {"source": "hub", "dataset": str(tmp_path / "wiki"), "max_articles": len(rows)}})
    data = repo.root / "data"
    run = subprocess.Popen(["dvc", "repro", "fetch-wiki"], cwd=repo.root, env=repo.env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (data.is_dir() and temp_files(data)) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, sig)  # the whole group, as Ctrl-C in a terminal does: dvc and the stage
    run.wait(timeout=60)
    wait_until_gone(run.pid)  # the stage may outlive dvc after SIGINT, longer on a busy machine
    assert run.returncode != 0, "the stage finished before the signal: make the corpus bigger"

    corpus = data / "corpus.jsonl"
    if corpus.exists():  # the signal came after the rename: then the file is complete
        assert len(read_jsonl(corpus)) == len(rows)
    if sig == signal.SIGINT:
        # Python's cleanup runs on SIGINT, unless dvc, interrupted too, kills the stage first (on a busy machine it
        # can): whatever temp file is left belongs to a writer that is gone, which the rerun below deletes
        for name in temp_files(data):
            pid = int(name.removeprefix(".corpus.jsonl.").split(".")[0])
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    repo.dvc("repro", "fetch-wiki")
    assert temp_files(data) == []  # the killed run's leftovers are gone
    assert len(read_jsonl(corpus)) == len(rows) == repo.json("metrics/corpus.json")["articles"]
    assert "up to date" in repo.dvc("status", "fetch-wiki").stdout
