"""Evaluation: reward-model accuracy by preference rating (Llama 2 Tables 7 and 8) and its report."""
