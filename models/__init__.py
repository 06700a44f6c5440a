"""PyTorch interest model: data loading, the LSTM, training, evaluation and baselines."""
