"""The model layer below training and inference: bases (name -> how it loads) and the heads."""
