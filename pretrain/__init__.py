"""Data sets and the DDPM pretraining loop."""
