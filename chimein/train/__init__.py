"""Training: the configuration, the trainer (TRL's SFTTrainer with the decision-weighted loss,
LoRA, the guards against the known traps), one run with MLflow tracking and resume, the
chattiness threshold calibrated on the validation split, and the launch on several processes."""
