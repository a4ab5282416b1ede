"""Prompt-free segmentation on a frozen SAM-family encoder (AutoSAM, CNN, linear heads) and a U-Net baseline."""
