"""Converters: Hugging Face <-> Megatron-core base weights and configs (megatron_weights.py), the lazy
reader of HF safetensors checkpoints (hf_checkpoint.py) and DeepSpeed ZeRO checkpoint exports
(zero_checkpoint.py). They import the frameworks they read, never the engines."""
