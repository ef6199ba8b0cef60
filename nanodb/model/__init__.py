"""The model layer: the CLIP model spec, open_clip loading, preprocessing and the image-tower runtimes."""
