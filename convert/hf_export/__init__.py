"""The PyTorch Backpack that `convert.export.save_hf` copies into every Hugging Face export.

These modules import only torch and transformers (never this project), because transformers runs
them from the export directory as remote code.
"""
