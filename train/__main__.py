"""`accelerate launch -m train CONFIG [key=value ...]`: train as configured.

`python -m train --help` lists every key with its default and the model presets;
`--print-config` prints the resolved config and exits. Also installed as `tokenclock-train`.
Exit codes: 0 done, 2 a user error or a bad launch (one `error:` line), 75 checkpointed and
stopped (train/stop.py).
"""

from __future__ import annotations

import argparse
import sys

from contracts.cli import DEBUG_ENV, run_main
from train.config import describe_keys, load_config, to_yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a decoder-only transformer (launch through `accelerate launch -m train`).",
        epilog=f"config keys (key=default) and model presets:\n{describe_keys()}\n\n"
        f"Errors are one line; {DEBUG_ENV}=1 shows the traceback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML training config, e.g. configs/train/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 steps=100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file < overrides, presets applied) and exit")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from train.loop import run  # torch and accelerate: not needed for --help or --print-config

    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    from train.distributed import check_launch

    check_launch()  # a launch that started fewer processes than asked for stops here
    return run_main(train, parse_args(argv))


if __name__ == "__main__":
    from train.distributed import exit_status

    with exit_status():  # records each rank's exit code for the launch scripts
        sys.exit(main())
