"""Offline evaluation on judged data: metrics, the evaluation methods, hash splits and the
click simulator."""
