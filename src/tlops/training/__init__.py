"""Training: linear probe on cached features, and full/partial fine-tuning of backbone + head."""
