"""Training: causal-LM pretraining on notes and instruction fine-tuning, both on the HF Trainer.

`run` holds what both stages share (arguments, resume, atomic final save, metrics), `pretrain`
and `finetune` shape their data, and `launch` starts them on GPUs (accelerate) or one CPU.
"""
