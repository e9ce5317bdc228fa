"""Running experts: the one decode loop, GRIFFIN's per-prompt selection, the task router with its
out-of-distribution test, and the multi-expert model.
"""
