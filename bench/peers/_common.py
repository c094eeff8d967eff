"""What the ToMe and EViT patches and the FLOP counter share."""
from typing import List, Sequence, Union

import torch.nn as nn


def per_block_r(r: Union[int, Sequence[int]], depth: int) -> List[int]:
    """ToMe's r as one value per block: an int is used for every block."""
    if isinstance(r, int):
        return [r] * depth
    r = [int(x) for x in r]
    if len(r) != depth:
        raise ValueError(f"r: expected an int or {depth} per-block values, got {len(r)}")
    return r


def check_plain_vit_blocks(model: nn.Module, who: str) -> None:
    """The class-swap patches only know timm's plain Block / Attention (no gated attention)."""
    from timm.models.vision_transformer import Attention, Block
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"{who}: block {i} is {type(blk).__name__} with "
                            f"{type(blk.attn).__name__}; expected timm Block with Attention")
        if getattr(blk.attn, "gate", None) is not None:
            raise TypeError(f"{who}: gated attention is not supported")
