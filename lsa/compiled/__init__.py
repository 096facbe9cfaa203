"""Compiled paths: FlexAttention block masks from keep masks and block tables."""

from lsa.compiled.flex import flex_reserve_attention, flex_sparse_attention, flex_supports

__all__ = ["flex_reserve_attention", "flex_sparse_attention", "flex_supports"]
