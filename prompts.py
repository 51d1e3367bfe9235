"""Learned prompt tokens for Visual Prompt Tuning (VPT, Jia et al. 2022).

Deep prompts hold one set of `num_tokens` tokens per encoder layer; shallow prompts one set for the first layer.
"""
import math

import torch
import torch.nn as nn


class Prompts(nn.Module):
    def __init__(self, num_layers: int, num_tokens: int, embed_dim: int, patch_size: int, dropout: float = 0.0):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_layers, num_tokens, embed_dim))
        # VPT's init: Xavier-uniform bound computed as if the prompt were a patch-embedding row (3*p*p inputs, d outputs)
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def forward(self, batch_size: int) -> torch.Tensor:
        """Prompt tokens as (num_layers, B or 1, num_tokens, dim).

        Without active dropout every image sees the same prompts, so the batch dimension stays 1 and callers
        broadcast it: the KV-only path then projects each layer's prompts once per batch, not once per image.
        Dropout draws an independent mask per image, as VPT does.
        """
        tokens = self.tokens.unsqueeze(1)
        if self.training and self.dropout.p > 0:
            tokens = self.dropout(tokens.expand(-1, batch_size, -1, -1))
        return tokens
