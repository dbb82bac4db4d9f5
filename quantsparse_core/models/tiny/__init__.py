"""The embedded tiny HunyuanVideo-architecture model: its weights, procedural training videos, fixed
prompt encoder and latent codec, training and evaluation. Kept apart from the model definition."""
