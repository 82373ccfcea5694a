"""Training throughput: useful FLOPs of a batch, real-token counts and model FLOPs utilisation.

FLOPs follow the usual convention (PaLM appendix B, and the anchors in
shared/reference/platform-notes.md): 6 FLOPs per weight per token for forward plus backward,
counting every matmul weight (the LM head too) but not the input embedding, which is a lookup;
plus 12 * layers * hidden * context per token for attention scores and values. Only real tokens
count: padding does no useful work, and a token of a packed example attends only to its own
example, so an example of s tokens contributes s (weights) and s^2 (attention) token units.
Recomputation by activation checkpointing is not counted (this is MFU, not hardware FLOPs).

MFU divides by the device's bf16 dense peak, looked up from its name (`peak_tflops_of`) unless
the run sets one; a device whose peak is not known gets no MFU (None), never a guessed number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# bf16 dense tensor-core peaks in TFLOP/s per GPU, from NVIDIA's datasheets: A100 (SXM and PCIe,
# 40 and 80 GB) 312 as stated; the Hopper figures are half the datasheets' "with sparsity" ones:
# H100 SXM and H200 SXM 1,979, H100 NVL and H200 NVL 1,671, H100 PCIe 1,513. The most specific
# pattern comes first; names are those torch.cuda.get_device_name reports, e.g. "NVIDIA A100-SXM4-80GB",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200". A GH200 (its own name) or an
# H800/H20 (other clocks and limits) does not match and stays unknown.
DEVICE_PEAKS_TFLOPS = (
    (re.compile(r"\bA100\b"), 312.0),
    (re.compile(r"\bH[12]00\b.*\bNVL\b"), 835.5),
    (re.compile(r"\bH100\b.*\bPCIe\b", re.IGNORECASE), 756.5),
    (re.compile(r"\bH[12]00\b"), 989.5),
)


def peak_tflops_of(device_name: str) -> float | None:
    """bf16 dense peak TFLOP/s of a device named as CUDA names it, or None when not known."""
    return next((peak for pattern, peak in DEVICE_PEAKS_TFLOPS if pattern.search(device_name)), None)


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count of a decoder-only transformer depends on."""

    matmul_params: int
    num_layers: int
    hidden_size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopModel:
        """From a (possibly meta-device) HF causal LM; tied output weights still cost a matmul."""
        config = model.config
        embedding = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embedding
        matmul = total - embedding.numel() + (embedding.numel() if tied else 0)
        return cls(matmul, config.num_hidden_layers, config.hidden_size)

    def flops(self, real_tokens: float, attended_pairs: float) -> float:
        """Training FLOPs for `real_tokens` tokens whose examples' squared lengths sum to `attended_pairs`."""
        return 6 * self.matmul_params * real_tokens + 12 * self.num_layers * self.hidden_size * attended_pairs

    def flops_per_token(self, context: int) -> float:
        """Per token of a full `context`-token sequence (e.g. a 2048-token pretraining block)."""
        return self.flops(1, context)


def batch_counts(batch: dict) -> torch.Tensor:
    """[real tokens, computed positions, sum of squared example lengths] of one micro-batch.

    Pure tensor arithmetic (no host sync): the squared lengths are summed as sum(2p + 1) over
    each real token's position p inside its example, since 1 + 3 + ... + (2s - 1) = s^2.
    Position ids that restart at 0 mark packed examples; without them, a row's real tokens
    (attention mask) form one example.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.dtype)
    positions = batch.get("position_ids")
    if positions is None:
        positions = real.cumsum(-1) - 1
    pairs = ((2 * positions + 1) * real).sum()
    return torch.stack([real.sum(), torch.tensor(input_ids.numel(), device=input_ids.device), pairs]).double()


@dataclass
class Window:
    """Counts gathered over all processes since the last log, and what they mean per second."""

    real_tokens: float
    positions: float
    attended_pairs: float
    seconds: float
    devices: int

    def record(self, flop_model: FlopModel, peak_tflops_per_device: float | None) -> dict:
        """Rates of the window; `mfu` is None when the device's peak is unknown."""
        rate = self.real_tokens / self.seconds if self.seconds > 0 else float("nan")
        achieved = flop_model.flops(self.real_tokens, self.attended_pairs) / self.seconds if self.seconds > 0 else 0.0
        mfu = None if peak_tflops_per_device is None else achieved / (peak_tflops_per_device * 1e12 * self.devices)
        return {
            "tokens_per_s": rate,
            "tokens_per_s_per_device": rate / self.devices,
            "real_token_fraction": self.real_tokens / self.positions if self.positions else float("nan"),
            "tflops_per_device": achieved / self.devices / 1e12,
            "mfu": mfu,
        }
