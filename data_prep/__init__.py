"""data_prep: read, clean, deduplicate, tokenize and pack text into token shards.

Entry points: `python -m data_prep CONFIG [key=value ...]` and `data_prep.run(config)`.
The output format (the contract with train/) is described in `contracts.dataset`.
"""

from data_prep.config import PrepConfig, load_config
from data_prep.pipeline import run

__all__ = ["PrepConfig", "load_config", "run"]
