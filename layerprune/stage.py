"""What every stage script shares: validated params, output paths from dvc.yaml, and one-line errors."""
import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from layerprune.errors import UserError
from layerprune.files import write_json
from layerprune.params import Params, load_params


def run_stage(main, *path_args: str, optional: tuple[str, ...] = (), description: str = "",
              processes=None, distributed=None) -> None:
    """Parse `--name PATH` arguments (dvc.yaml passes every path, so scripts never repeat them),
    load and validate params.yaml, then call main(params, **paths); `optional` paths may be left out (None).
    `processes(params)`, where given, is how many processes the stage runs as (see launch); `distributed(params)`
    true runs it under torchrun even as one process.

    A UserError is printed as one line and exits 2; LAYERPRUNE_DEBUG=1 shows the traceback instead.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    for name in path_args + optional:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=name in path_args)
    args = vars(parser.parse_args())
    try:
        params: Params = load_params(args.pop("params"))
        if processes is not None:
            launch(processes(params), always=bool(distributed and distributed(params)))
        main(params, **args)
    except UserError as err:
        if os.environ.get("LAYERPRUNE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def launch(count: int, always: bool = False) -> None:
    """Run this stage script as `count` processes under torchrun (torch.distributed.run), unless it is one of them
    already. One process is a plain run (no launcher start-up, and an error stays one line) unless `always`: FSDP runs
    only under a launcher. A multi-node run starts the script with torchrun itself (docs/heal-at-scale.md), which sets
    LOCAL_RANK, so nothing is launched twice."""
    if (count > 1 or always) and "LOCAL_RANK" not in os.environ:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={count}", *sys.argv])


def write_timing(output, **timings) -> None:
    """Record how long a stage's work took, beside its output but outside DVC and git: logs/<output name>.timing.json.

    Timings change on every run; in a tracked file they would make a rerun of a committed state look like a change
    (and, in a DVC output, change dvc.lock)."""
    write_json(Path("logs") / f"{Path(output).stem}.timing.json",
               {**{key: round(value, 3) for key, value in timings.items()},
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
