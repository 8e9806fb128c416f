"""Reinforcement learning with human feedback (Llama 2 section 3.2.3): rewards, advantages, rollouts."""
