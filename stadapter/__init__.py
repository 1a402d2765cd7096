"""stadapter: what users import.

- `STAdapter`: the drop-in replacement for the official ST-Adapter module.
- `add_st_adapters` / `remove_st_adapters` / `set_num_frames`: put adapters into a timm,
  open_clip or OpenAI-CLIP ViT in place, and take them out.
- `save_adapters` / `load_adapters`: the trainable tensors plus the config, in safetensors.
- `stadapter.models.VideoViT`: clips -> logits, and the official checkpoints.

Built only on the public names of `stadapter_kernels`; no backbone library is imported here.
"""

from .checkpoint import AdapterFileError, load_adapters, save_adapters, trainable_state_dict
from .inject import AdapterConfig, AdapterSummary, add_st_adapters, remove_st_adapters, set_num_frames, summarize
from .modules import STAdapter

__all__ = ["AdapterConfig", "AdapterFileError", "AdapterSummary", "STAdapter", "add_st_adapters", "load_adapters",
           "remove_st_adapters", "save_adapters", "set_num_frames", "summarize", "trainable_state_dict"]
__version__ = "0.1.0"
