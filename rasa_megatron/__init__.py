"""rasa_megatron: RaSA (Rank-Sharing Low-Rank Adaptation, He et al., ICLR 2025) for large-scale fine-tuning."""
from .adapter import AdapterFormatError, export_peft_lora, load_adapter, save_adapter
from .config import LLAMA_LINEARS, RaSAConfig
from .inject import (adapter_state_dict, apply_rasa, merge_adapter, merge_and_unload, rasa_layers,
                     unmerge_adapter)
from .experts import RaSAExperts, RaSAExpertWeights
from .layers import RaSALinear
from .pool import RankPool

__all__ = [
    "AdapterFormatError", "LLAMA_LINEARS", "RaSAConfig", "RaSAExperts", "RaSAExpertWeights", "RaSALinear", "RankPool", "adapter_state_dict",
    "apply_rasa", "export_peft_lora", "load_adapter", "merge_adapter", "merge_and_unload", "rasa_layers",
    "save_adapter", "unmerge_adapter",
]
__version__ = "0.1.0"
