"""Pure maths on tensors: importance scores, layer allocation, the least-squares refit and the OBS choice.

No torch.nn module and no file: every function here is a function of its arguments
(tests/test_structure.py checks the imports).
"""
