"""Networks and their interfaces.

Conventions used everywhere (architecture.md §3): videos are `[B, F, C, H, W]` latent frames; noise levels are
`sigma[B, F]` in [0, 1] with `x_s = (1 - s) x0 + s eps`; a block is K frames; tokens per frame are
(H / ph) * (W / pw), derived from shapes, never assumed.
"""
