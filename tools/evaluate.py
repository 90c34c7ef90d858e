"""Evaluate any model form: lm-eval tasks, MATH-style grading, HumanEval pass@k (= ``rasa-eval``)."""
import sys

from rasa_megatron.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
