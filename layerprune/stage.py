"""What every stage script shares: validated params, output paths from dvc.yaml, and one-line errors."""
import argparse
import os
import sys

from layerprune.errors import UserError
from layerprune.params import Params, load_params


def run_stage(main, *path_args: str, optional: tuple[str, ...] = (), description: str = "") -> None:
    """Parse `--name PATH` arguments (dvc.yaml passes every path, so scripts never repeat them),
    load and validate params.yaml, then call main(params, **paths); `optional` paths may be left out (None).

    A UserError is printed as one line and exits 2; LAYERPRUNE_DEBUG=1 shows the traceback instead.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    for name in path_args + optional:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=name in path_args)
    args = vars(parser.parse_args())
    try:
        params: Params = load_params(args.pop("params"))
        main(params, **args)
    except UserError as err:
        if os.environ.get("LAYERPRUNE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
