"""``tellnorm bench``: norms (tracing overhead), techniques (per-token bookkeeping) and backends (vLLM vs HF)."""
