"""The paper's §3 analysis: reconstruction-error math (reconstruction.py), the weight updates it is run
on (weight_updates.py) and the study that writes its CSV, figures and summary (study.py)."""
from .reconstruction import (RaSAFactors, lora_reconstruction_error, rasa_coordinate_descent,
                             rasa_reconstruction_error, theorem_feasible_solution)

__all__ = ["RaSAFactors", "lora_reconstruction_error", "rasa_coordinate_descent", "rasa_reconstruction_error",
           "theorem_feasible_solution"]
