"""Entry points, one hydra app each: ``ssl-path-tile`` (tile), ``ssl-path-train`` (train),
``ssl-path-eval`` (evaluate), ``ssl-path-export`` (export). Each ``run(cfg)`` does the work; ``main``
is the console script."""
