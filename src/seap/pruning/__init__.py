"""Plans and what builds and applies them: the plan artifact and its building, reconstruction passes,
slicing and masking a model (surgery), streaming a checkpoint through a plan, and collect / prune / apply.
"""
