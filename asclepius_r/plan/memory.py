"""Memory per GPU: what one training process and one answering job need, in bytes.

Training (`training_memory_bytes`): weights and Adam state, sharded over the job's devices under
FSDP; the gradients as the training code holds them (`gradient_bytes`); activations of one
micro-batch; fp32 logits and their gradient; FSDP's gathered layers; overhead. Answering the
held-out questions (`inference_memory_bytes`): weights and the KV cache of one batch. The plan
writes these per job and the preflight holds them against the visible GPUs'
`USABLE_MEMORY_FRACTION`.
"""

from __future__ import annotations

# Bytes per parameter: training holds fp32 weights and Adam's two fp32 moments (sharded over the
# job's devices under FSDP), plus the gradients (`gradient_bytes`).
STATE_BYTES_PER_PARAM = 12
GRADIENT_BYTES_PER_PARAM = 4  # fp32, as accumulated and reduce-scattered (train.run.configure_fsdp)
# While a layer's backward runs under FSDP, its gradient is whole: bf16 as computed and fp32 as
# reduce-scattered; two layers are in flight when the reduce-scatter overlaps the next backward.
LAYER_GRADIENT_BYTES_PER_PARAM = 2 + 4
# Activation memory per token and layer under memory-efficient attention (Korthikanti et al.
# 2022: 34 h bytes in 16-bit); with activation checkpointing each layer keeps only its 2 h-byte
# input and one layer at a time holds the full set.
ACTIVATION_BYTES_PER_HIDDEN = 34
GPU_OVERHEAD_BYTES = 3 * 2**30  # CUDA context, NCCL buffers, allocator slack
USABLE_MEMORY_FRACTION = 0.9


def gradient_bytes(shape: dict, params: int, devices: int, sharded: bool) -> int:
    """Gradient memory of one training process between and during micro-batches.

    Under FSDP the training code reduce-scatters every micro-batch's gradients
    (`sync_each_batch`), so a process keeps its fp32 shard of the accumulated gradients plus the
    whole gradients of the layers whose backward is in flight. Without that sync FSDP2 keeps every
    parameter's fp32 gradient whole on every rank until the step (4 bytes per parameter per GPU,
    what made 13B run out of memory). Without FSDP each process holds the whole fp32 gradients.
    """
    if not sharded:
        return GRADIENT_BYTES_PER_PARAM * params
    layer = (params - 2 * shape["vocab_size"] * shape["hidden_size"]) / shape["num_hidden_layers"]
    return int(GRADIENT_BYTES_PER_PARAM * params / devices + 2 * LAYER_GRADIENT_BYTES_PER_PARAM * layer)


def training_memory_bytes(shape: dict, params: int, settings: dict, stage: str, devices: int, sharded: bool) -> int:
    """Memory one training process needs: weights and optimizer state (sharded over `devices`
    under FSDP), gradients (`gradient_bytes`), activations of one micro-batch, fp32 logits and
    their gradient, FSDP's gathered layers, overhead."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    # Fine-tuning trains one pack of at most max_length tokens per micro-batch.
    tokens = settings["max_length"] * (settings["per_device_batch_size"] if stage == "pretrain" else 1)
    state = STATE_BYTES_PER_PARAM * params / (devices if sharded else 1)
    state += gradient_bytes(shape, params, devices, sharded)
    layer_set = ACTIVATION_BYTES_PER_HIDDEN * h * tokens
    if settings["gradient_checkpointing"]:
        activations = 2 * h * tokens * layers + layer_set
    else:
        activations = layer_set * layers
    logits = 8 * vocab * tokens
    gathered = 2 * 2 * (params - 2 * vocab * h) / layers if sharded else 0  # two bf16 layers in flight
    return int(state + activations + logits + gathered + GPU_OVERHEAD_BYTES)


def inference_memory_bytes(shape: dict, params: int, config: dict, on_gpu: bool) -> int:
    """Weights (bf16 on a GPU, fp32 on CPU), the KV cache of one batch (times its beams) at full
    length, overhead."""
    evaluate = config["evaluate"]
    context = shape.get("max_position_embeddings", 2048)
    length = (
        min(context, evaluate["max_prompt_tokens"] + evaluate["max_new_tokens"])
        if evaluate["max_prompt_tokens"]
        else context
    )
    weights = (2 if on_gpu else 4) * params
    sequences = evaluate["batch_size"] * evaluate["num_beams"]
    cache = sequences * length * shape["num_hidden_layers"] * 2 * shape["hidden_size"] * 2
    return int(weights + cache + GPU_OVERHEAD_BYTES)
