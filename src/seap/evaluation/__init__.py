"""Measuring: the lm-eval tasks and their scoring, perplexity, XSum generation, eval reports, routed
evaluation, speed (`seap bench`) and the router's confusion figure."""
