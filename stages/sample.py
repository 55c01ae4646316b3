"""Stage `sample`: a seeded random sample of calibration texts and disjoint held-out evaluation texts."""
from layerprune.files import read_jsonl, write_json, write_jsonl
from layerprune.stage import run_stage
from layerprune.texts import split_samples


def main(params, corpus, calibration, eval_texts, metrics):
    s = params.sample
    split = split_samples(read_jsonl(corpus), s.calibration, s.eval, s.min_chars, s.max_chars, s.seed)
    write_jsonl(calibration, split.calibration)
    write_jsonl(eval_texts, split.eval)
    write_json(metrics, {
        "calibration_texts": len(split.calibration),
        "eval_texts": len(split.eval),
        "dropped": split.dropped,
    })


if __name__ == "__main__":
    run_stage(main, "corpus", "calibration", "eval_texts", "metrics", description=__doc__)
