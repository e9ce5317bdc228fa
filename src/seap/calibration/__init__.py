"""Passes over calibration texts: the engine (layer loop, hooks, observers), activation statistics, the
Gram accumulator, the statistics pass, resume checkpoints of a pass, sums across torch.distributed
processes and a pass's cost estimate.
"""
