"""axolotl plugins used by tests/test_axolotl.py (``forward_counter``: forwards per step, log history, classes)."""
