"""Networks and LightningModules: the encoder, COLA pretraining, genre classification."""
