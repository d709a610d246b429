"""The baseline: the stock timm model, untouched."""

from tokred.reducers import register_reducer
from tokred.reducers.base import TokenReducer


@register_reducer
class NoReduction(TokenReducer):
    name = "none"
