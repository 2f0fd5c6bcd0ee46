"""Evaluation on BFCL multi-turn: `bfcl.evaluate` (validation and scripts/eval_bfcl.py) and bfcl-eval's checker."""
