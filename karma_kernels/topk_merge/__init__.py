"""Top-k merge of sharded ANN search results (compiled op in csrc/, numpy reference as oracle and fallback)."""
from .op import topk_merge
from .reference import topk_merge_reference

__all__ = ["topk_merge", "topk_merge_reference"]
