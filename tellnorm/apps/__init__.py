"""Applications over the core and the studies: the command line, the one-command reproduction, the dashboards and
explorer, the lm-eval harness, Ray sharding and the benchmarks."""
