"""The model layer: spec (what model, how to run it: ModelSpec, ModelConfig), preprocess (the image
steps, from the model's preprocess config), clip (open_clip loading: ClipModel, load_model) and
runtimes/ (the image-tower runtimes, one file each, found by a registry)."""
