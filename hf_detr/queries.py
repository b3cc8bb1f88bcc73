"""Decoder query builders: what the decoder starts from. The extension point for query variants.

A builder is an `nn.Module` called with the batch size that returns two `[batch, num_queries, d_model]`
tensors: the content queries (the decoder's input hidden states) and the query position embeddings
(added to the queries at every decoder layer, in self- and cross-attention). A new variant is a class
here, one entry in `QUERY_BUILDERS`, and one value of `HfDetrConfig.query_type` (`QueryType`).
"""

import torch
from torch import nn


class DetrQueries(nn.Module):
    """Vanilla DETR (Carion et al., 2020, sec. 3.2): the content queries start as zeros, so everything
    that tells one detection slot from another is its learned position embedding ("object query"),
    `nn.Embedding(num_queries, d_model)`, which the decoder adds again at every layer."""

    def __init__(self, num_queries: int, d_model: int):
        super().__init__()
        self.position_embeddings = nn.Embedding(num_queries, d_model)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (content queries [B, Q, D] all zeros, query position embeddings [B, Q, D])."""
        position = self.position_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        return torch.zeros_like(position), position


QUERY_BUILDERS = {"detr": DetrQueries}
