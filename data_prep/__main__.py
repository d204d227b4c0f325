"""`python -m data_prep CONFIG [key=value ...]` (or `tokenclock-prep`): prepare the dataset a YAML
config describes."""

from __future__ import annotations

import argparse
import logging
import sys

from contracts.cli import run_main
from data_prep.config import load_config
from data_prep.pipeline import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Read, clean, deduplicate, tokenize and pack a corpus into token shards.",
    )
    p.add_argument("config", help="prep YAML config, e.g. configs/prep/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. tokenizer.vocab_size=1024"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_main(prepare, args)


def prepare(args: argparse.Namespace) -> int:
    """A bad config, a missing input or an unusable tokenizer (PretrainedTokenizerError, a
    ValueError) is one `error:` line and exit code 2 (contracts.cli.run_main)."""
    cfg = load_config(args.config, args.overrides)
    run(cfg)
    print(f"prepared dataset: {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
