"""A batch of texts run through the text tower at only as many token positions as it needs.

Every text is tokenized to the full context length (77), but a query is typically 5-15 tokens, the rest
padding. open_clip's CLIP text transformer masks attention causally (a position sees only the positions
before it) and takes a text's feature at its end token (the argmax of its token ids), so a text's vector
depends only on the positions up to its end token: the token matrix cut to L = the batch's longest
end-token position + 1, with the positional embedding and the causal mask cut to L, gives the same
vectors (up to float rounding) at a fraction of the cost. Models built otherwise (no causal mask, another
pooling, open_clip's CustomTextCLIP) run at the full length."""

from __future__ import annotations

import numpy as np


def cuttable(model) -> bool:
    """Whether `model` (an open_clip model) is a CLIP whose text tower may run cut to a batch's length:
    a causal attention mask (checked, not assumed) and the feature taken at the argmax of the token ids."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if (not isinstance(model, open_clip.CLIP) or type(model).encode_text is not open_clip.CLIP.encode_text
            or getattr(model, "text_pool_type", None) != "argmax" or mask is None):
        return False
    n = model.positional_embedding.shape[0]
    if tuple(mask.shape) != (n, n):
        return False
    future = torch.ones(n, n, dtype=torch.bool).triu(1)  # what a causal mask hides: the positions after
    mask = mask.float()
    return bool(torch.isneginf(mask[future]).all() and (mask[~future] == 0).all())


def needed_length(tokens) -> int:
    """The token positions a batch (N, context_length) needs: up to its longest text's end token, found as
    the model finds it (the first argmax of each row's ids)."""
    if len(tokens) == 0:
        return int(tokens.shape[1])
    return int(np.asarray(tokens).argmax(axis=1).max()) + 1


def encode_text_cut(model, tokens):
    """open_clip's CLIP.encode_text (not normalized) for tokens (N, L), L at most the context length, with
    the positional embedding and causal mask cut to L; `model` must be `cuttable`. Traceable with L dynamic."""
    from open_clip.transformer import text_global_pool
    from torch import nn

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x
