"""Fine-tuning the encoder on feedback and judged pairs."""
