"""The one table of numeric precisions: the training switch, the torch dtype, the catalog key.

`mixed_precision` in a training config, the dtype the trainer measures its peak in, the
autocast mode it hands accelerate, and the `<key>_tflops` column of the estimator's hardware
catalog are spellings of one thing; they are translated here and nowhere else. fp8 is the one
whose parts differ: its matmuls run in float8 (torchao's float8 linears, `train/fp8.py`), its
MFU is against the fp8 peak, and what stays out of float8 runs under bf16 autocast. Plain
Python (no torch import), so the estimator can use it; the trainer turns `torch_dtype` into a
dtype with getattr(torch, ...).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    switch: str  # the value of `mixed_precision` in a training config
    torch_dtype: str  # the autocast / matmul dtype, an attribute name of torch
    catalog: str  # the key of its dense peak in estimate/catalog.yaml (`<key>_tflops`)
    bytes: int  # bytes per element of the compute dtype
    trainable: bool = True  # accepted by `mixed_precision` (else: a catalog column only)
    autocast: str = ""  # accelerate's mixed_precision for the run ("" = the switch itself)

    @property
    def accelerate(self) -> str:
        """The value of accelerate's `mixed_precision` (no | bf16 | fp16) for this switch."""
        return self.autocast or self.switch


PRECISIONS: dict[str, Precision] = {
    p.catalog: p
    for p in (
        Precision("no", "float32", "fp32", 4),
        Precision("bf16", "bfloat16", "bf16", 2),
        Precision("fp16", "float16", "fp16", 2),
        Precision("fp8", "float8_e4m3fn", "fp8", 1, autocast="bf16"),
        Precision("tf32", "float32", "tf32", 4, trainable=False),
    )
}
TRAINING_SWITCHES = tuple(p.switch for p in PRECISIONS.values() if p.trainable)


def precision(name: str) -> Precision:
    """The precision called `name`: a catalog key (fp32, bf16, ...), a training switch (no) or a
    torch dtype name (bfloat16)."""
    for p in PRECISIONS.values():
        if name in (p.catalog, p.switch, p.torch_dtype):
            return p
    raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
