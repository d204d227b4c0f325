"""`accelerate launch -m train CONFIG [key=value ...]`: train as configured."""

from __future__ import annotations

import argparse
import sys

from train.config import load_config
from train.distributed import check_launch, exit_status
from train.loop import run


def main(argv: list[str] | None = None) -> None:
    check_launch()  # a launch that started fewer processes than asked for stops here
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a decoder-only transformer (launch through `accelerate launch -m train`).",
    )
    parser.add_argument("config", help="YAML training config, e.g. configs/train/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    run(cfg)


if __name__ == "__main__":
    with exit_status():  # exit codes: 0 done, 2 bad launch, 75 stopped (train/stop.py)
        main()
