def available(device=None) -> str:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as error:
        return f"unavailable: torch has no FlexAttention ({error})"
    return "available"


def run(q, k, v, layout, *, scale):
    from blockattn.ops.flex import flex_attention
    return flex_attention(q, k, v, layout, scale=scale)
