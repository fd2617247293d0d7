"""Training pieces shared by pretraining, SFT, reward modelling and PPO."""
