"""Parallelism applied to the model from outside (DESIGN.md): `pipeline` splits a Transformer
into pipeline stages at block boundaries and runs them under torch.distributed.pipelining."""
