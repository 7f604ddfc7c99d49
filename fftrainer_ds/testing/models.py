"""A small GPT with dropout and a deterministic token dataset, for tests, the demo and benchmarks."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer; forward(tokens) returns the next-token cross-entropy loss."""

    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        self.seq = seq
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x_in, y = tokens[:, :-1], tokens[:, 1:]
        t = x_in.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        x = self.drop(self.tok(x_in) + self.pos(torch.arange(t, device=tokens.device)))
        for blk in self.blocks:
            x = blk(x, mask.to(x.dtype))
        logits = self.head(self.ln(x)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class TokenDataset(torch.utils.data.Dataset):
    """Deterministic pseudo-text: sample i is the same sequence in every process."""

    def __init__(self, n: int = 4096, seq: int = 32, vocab: int = 256, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, vocab, (n, seq + 1), generator=g)
        # Learnable structure: each token partly predicts the next.
        self.data = (base + torch.arange(seq + 1) * 7) % vocab

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def ds_config(stage: int, dtype: str = "fp32", micro_batch: int = 2, grad_accum: int = 1,
              fast_failover: Optional[Dict[str, Any]] = None, lr: float = 1e-3) -> Dict[str, Any]:
    """A DeepSpeed config for TinyGPT on CPU (torch AdamW, WarmupLR, clipping)."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                      "warmup_num_steps": 5}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if fast_failover is not None:
        cfg["fast_failover"] = copy.deepcopy(fast_failover)
    return cfg
