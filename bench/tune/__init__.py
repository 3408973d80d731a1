"""`mobiserve tune`: find the serving configuration with the best throughput within a latency
budget on this machine, with the user's model and images, and write it as a `serve --config` file.

`space` says what is tried and in which order (pure), `measure` serves one configuration and loads
it with the harness's load generator, `output` writes the config, table, JSON and plot, `cli` parses
and runs within the time budget.
"""
