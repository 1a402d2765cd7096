"""Few-shot action recognition on frozen image ViTs: MA-CLIP and temporal alignment metrics."""
