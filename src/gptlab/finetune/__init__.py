"""Fine-tuning: synthetic chat data, supervised fine-tuning and classification heads."""
