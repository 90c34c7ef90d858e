"""The DeepSpeed engine (``engine: deepspeed``): ZeRO-2/3 training of RaSA / LoRA / full fine-tuning
(engine.py), resident pools and gathered fp32 saves under ZeRO-3 (zero3.py), the world-size-independent
training state (portable.py) and the ZeRO memory table of the dry run (memory.py)."""
