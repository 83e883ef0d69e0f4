"""The fixed set of processors `model.toml` chooses from: images and text in, labels and
embeddings out. Nothing here ever imports or executes a file from the model repository:
a tokenizer is read as JSON data by Hugging Face `tokenizers`, images are decoded by
Pillow, and everything a processor does is declared in `[preprocess]` and `[postprocess]`.
"""
