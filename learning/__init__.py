"""The learning check (`make learning-check`): a real model through the recipe (learning/run.py)."""
