"""Trainer pieces shared by train_net.py, tools and tests."""
