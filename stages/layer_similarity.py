"""Stage `layer-similarity`: how much every block of consecutive decoder layers changes the hidden state.

With similarity.processes > 1 it runs as that many processes under torchrun: each one scores its share of the texts
(one GPU each on CUDA) and rank 0 writes the outputs. Each process keeps its running sums in `checkpoints` (left out:
none), so a killed pass resumes where it stopped."""
import time

from layerprune.files import read_jsonl, write_csv, write_json
from layerprune.forward import pad_token_id, tokenize
from layerprune.models import ModelInfo, load_model, pick_device
from layerprune.similarity import layer_distances, process_group, similarity_workload
from layerprune.stage import run_stage, write_timing


def main(params, model_info, calibration, distances, metrics, checkpoints=None):
    sim = params.similarity
    device = pick_device(params.model.device)
    info = ModelInfo.load(model_info)
    with process_group(device) as (rank, gpu):
        workload = similarity_workload(sim.batch_size, sim.max_length, info.num_layers)
        model, tokenizer = load_model(info.model_dir(), device, gpu=gpu, workload=workload)
        texts = [row["text"] for row in read_jsonl(calibration)]
        token_ids, dropped = tokenize(tokenizer, texts, sim.max_length)
        started = time.perf_counter()
        result = layer_distances(model, token_ids, batch_size=sim.batch_size, pad_id=pad_token_id(tokenizer),
                                 checkpoints=checkpoints, model_key=f"{info.id}@{info.revision}")
        seconds = time.perf_counter() - started
        result = result.as_written()  # its best blocks are then those that choose-range reads
    if rank != 0:  # every process holds the same result
        return
    write_csv(distances, result.to_rows())
    # the pass alone, without loading: bench/scale.py sets its rate beside one in-memory layer's
    write_timing(metrics, seconds=seconds, tokens_per_second=result.num_tokens / seconds)
    write_json(metrics, {
        "metric": sim.metric,
        "samples": result.num_samples,
        "tokens": result.num_tokens,
        "dropped_texts": {"fewer_than_2_tokens": dropped},
        "best_start": {str(n): {"start": start, "distance": round(value, 6)}
                       for n, (start, value) in result.best_starts(sim.metric).items()},
    })


if __name__ == "__main__":
    run_stage(main, "model_info", "calibration", "distances", "metrics", optional=("checkpoints",),
              description=__doc__, processes=lambda params: params.similarity.processes)
