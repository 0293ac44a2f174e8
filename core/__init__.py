"""Host-agnostic core of emergent-seg: pure torch, never imports ComfyUI."""
